#include "discovery/sources.h"

#include "discovery/dns_source.h"
#include "discovery/k8s_source.h"
#include "discovery/static_source.h"

namespace stepflow {

std::unique_ptr<EndpointSource> make_endpoint_source(const Config& config, event_base* control_base, std::string& error) {
    switch (config.discovery) {
    case DiscoveryMode::Static: {
        std::vector<Endpoint> endpoints;
        if (!StaticSource::resolve(config.backends, endpoints, error)) {
            error = "--backends: " + error;
            return nullptr;
        }
        return std::make_unique<StaticSource>(std::move(endpoints));
    }
    case DiscoveryMode::Dns: {
        HostPort target;
        if (!parse_host_port(config.upstream_service, target) || target.port == 0) {
            error = "--upstream-service: '" + config.upstream_service + "' is not host:port";
            return nullptr;
        }
        return std::make_unique<DnsSource>(control_base, std::move(target), config.dns_interval);
    }
    case DiscoveryMode::Kubernetes: {
        K8sSettings settings;
        if (!k8s_settings_from_config(config, settings, error)) return nullptr;
        return K8sSource::create(control_base, std::move(settings), error);
    }
    }
    error = "unknown discovery mode";
    return nullptr;
}

}  // namespace stepflow
