// What a discovery source reports: the endpoints of the worker Service, as the source sees them.
// Sources know nothing of instances or health; the FleetManager turns endpoints into instances.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace stepflow {

struct Endpoint {
    std::string address;  // "ip:port", "[v6]:port" or "host:port"
    std::string pod;      // targetRef name, empty when unknown
    bool ready = true;        // may take new work
    bool serving = true;      // can still serve (true while terminating if still passing readiness)
    bool terminating = false;

    bool operator==(const Endpoint&) const = default;
};

// Called with the complete current endpoint set each time it changes. Runs on the control thread.
using EndpointsCallback = std::function<void(std::vector<Endpoint>)>;

class EndpointSource {
public:
    virtual ~EndpointSource() = default;
    // Starts producing endpoint sets on the control event loop. A source keeps reporting its last
    // known set through API trouble rather than reporting an empty one.
    virtual void start(EndpointsCallback on_change) = 0;
    // For /debug and logs: "static", "dns", "kubernetes (endpointslices)", ...
    virtual std::string describe() const = 0;
};

}  // namespace stepflow
