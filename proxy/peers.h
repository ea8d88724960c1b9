// The other replicas of this balancer, asked for their demand when this one answers the
// autoscaler: KEDA talks to one replica through the Service, but the fleet is sized on the work
// held and running at all of them. Peers come from the balancer's own Service (--peer-service,
// its EndpointSlices, same RBAC as worker discovery) or a static list (--peers). Control thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>

#include "core/config.h"
#include "discovery/endpoint.h"

struct event_base;

namespace stepflow {

class Peers {
public:
    Peers(event_base* base, const Config& config);
    ~Peers();
    // Starts watching --peer-service (when given). False with `error` when it cannot be set up.
    bool start(std::string& error);

    struct Sum {
        uint64_t demand = 0;  // sum of the answers received
        size_t asked = 0;
        size_t reached = 0;
    };
    // Asks every peer's /demand (admin port) at once; `done` runs once, with what answered within
    // --peer-timeout: a peer that is slow or gone is left out, never waited for.
    void poll(std::function<void(Sum)> done);

    const std::vector<std::string>& addresses() const { return addresses_; }

    // Parses the "demand" field of a /demand body. False when it has none.
    static bool parse_demand(std::string_view body, uint64_t& out);

private:
    void set_endpoints(const std::vector<Endpoint>& endpoints);

    event_base* base_;
    const Config& config_;
    std::string self_;  // this pod's name (hostname): not a peer of itself
    std::vector<std::string> addresses_;
    std::unique_ptr<EndpointSource> source_;
    prometheus::Gauge& reached_gauge_;
    prometheus::Counter& reached_;
    prometheus::Counter& missed_;
};

}  // namespace stepflow
