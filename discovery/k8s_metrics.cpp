#include "discovery/k8s_metrics.h"

#include <chrono>
#include <mutex>

#include "core/metrics_registry.h"

namespace stepflow {
namespace {

// Families live as long as the registry (the process); building them twice would clash, so every
// K8sMetrics instance (tests make several) shares one set.
struct Families {
    prometheus::Family<prometheus::Counter>& restarts;
    prometheus::Family<prometheus::Counter>& relists;
    prometheus::Family<prometheus::Counter>& events;
    prometheus::Family<prometheus::Gauge>& last_sync;
    prometheus::Family<prometheus::Counter>& errors;
};

Families& families() {
    static Families* f = [] {
        auto& r = MetricsRegistry::get().registry();
        using prometheus::BuildCounter;
        using prometheus::BuildGauge;
        return new Families{
            BuildCounter().Name("stepflow_lb_k8s_watch_restarts_total")
                .Help("Watches started again after a watch ended or failed (not counting the first after a list)")
                .Register(r),
            BuildCounter().Name("stepflow_lb_k8s_relists_total")
                .Help("Full lists after the first sync (410 Gone, garbled streams)").Register(r),
            BuildCounter().Name("stepflow_lb_k8s_watch_events_total").Help("Watch events received, by type").Register(r),
            BuildGauge().Name("stepflow_lb_k8s_last_sync_timestamp_seconds")
                .Help("Unix time of the last completed list or watch event").Register(r),
            BuildCounter().Name("stepflow_lb_k8s_api_errors_total")
                .Help("Kubernetes API errors by HTTP status code (\"network\": no response)").Register(r),
        };
    }();
    return *f;
}

}  // namespace

K8sMetrics::K8sMetrics()
    : restarts_(families().restarts.Add({})), relists_(families().relists.Add({})), events_(families().events),
      last_sync_(families().last_sync.Add({})), errors_(families().errors) {}

void K8sMetrics::relist() { relists_.Increment(); }
void K8sMetrics::watch_restart() { restarts_.Increment(); }
void K8sMetrics::event(K8sWatchEvent::Type type) { events_.Add({{"type", to_string(type)}}).Increment(); }

void K8sMetrics::synced() {
    auto now = std::chrono::system_clock::now().time_since_epoch();
    last_sync_.Set(std::chrono::duration<double>(now).count());
}

void K8sMetrics::api_error(int status) {
    errors_.Add({{"code", status == 0 ? std::string("network") : std::to_string(status)}}).Increment();
}

}  // namespace stepflow
