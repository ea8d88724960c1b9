// Discovery's own counters: its operations (lists, watches, DNS resolutions, endpoint updates)
// and the active /health checks. The Kubernetes watch has more (discovery/k8s_metrics.h).
#pragma once

#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>

namespace stepflow {

class DiscoveryMetrics {
public:
    static DiscoveryMetrics& get();

    // stepflow_lb_discovery_operations_total{operation, result}
    prometheus::Counter& operation(const std::string& operation, const std::string& result);
    // stepflow_lb_health_checks_total{result}: success, failure or skipped
    prometheus::Counter& health_check(const std::string& result);

private:
    DiscoveryMetrics();
    prometheus::Family<prometheus::Counter>& operations_;
    prometheus::Family<prometheus::Counter>& health_checks_;
};

}  // namespace stepflow
