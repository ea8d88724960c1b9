#include "discovery/sources.h"

#include "discovery/static_source.h"

namespace stepflow {

std::unique_ptr<EndpointSource> make_endpoint_source(const Config& config, event_base*, std::string& error) {
    switch (config.discovery) {
    case DiscoveryMode::Static: {
        std::vector<Endpoint> endpoints;
        if (!StaticSource::resolve(config.backends, endpoints, error)) {
            error = "--backends: " + error;
            return nullptr;
        }
        return std::make_unique<StaticSource>(std::move(endpoints));
    }
    case DiscoveryMode::Dns: error = "--discovery dns is not available in this build yet"; return nullptr;
    case DiscoveryMode::Kubernetes: error = "--discovery kubernetes is not available in this build yet"; return nullptr;
    }
    error = "unknown discovery mode";
    return nullptr;
}

}  // namespace stepflow
