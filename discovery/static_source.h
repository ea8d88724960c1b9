// Static discovery: the backends given with --backends, resolved once at start-up.
#pragma once

#include <string>
#include <vector>

#include "discovery/endpoint.h"

namespace stepflow {

class StaticSource : public EndpointSource {
public:
    // Resolves every host:port (names through the system resolver); on failure sets `error`.
    static bool resolve(const std::vector<std::string>& backends, std::vector<Endpoint>& out, std::string& error);

    explicit StaticSource(std::vector<Endpoint> endpoints) : endpoints_(std::move(endpoints)) {}
    void start(EndpointsCallback on_change) override { on_change(endpoints_); }
    std::string describe() const override { return "static"; }

private:
    std::vector<Endpoint> endpoints_;
};

}  // namespace stepflow
