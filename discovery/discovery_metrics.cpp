#include "discovery/discovery_metrics.h"

#include "core/metrics_registry.h"

namespace stepflow {

DiscoveryMetrics& DiscoveryMetrics::get() {
    static DiscoveryMetrics* metrics = new DiscoveryMetrics();
    return *metrics;
}

DiscoveryMetrics::DiscoveryMetrics()
    : operations_(prometheus::BuildCounter().Name("stepflow_lb_discovery_operations_total")
                      .Help("Discovery operations by operation and result")
                      .Register(MetricsRegistry::get().registry())),
      health_checks_(prometheus::BuildCounter().Name("stepflow_lb_health_checks_total")
                         .Help("Active /health checks by result").Register(MetricsRegistry::get().registry())) {}

prometheus::Counter& DiscoveryMetrics::operation(const std::string& operation, const std::string& result) {
    return operations_.Add({{"operation", operation}, {"result", result}});
}

prometheus::Counter& DiscoveryMetrics::health_check(const std::string& result) {
    return health_checks_.Add({{"result", result}});
}

}  // namespace stepflow
