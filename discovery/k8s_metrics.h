// The Kubernetes discovery metrics, fed by the reflector's hooks.
#pragma once

#include <map>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>

#include "discovery/reflector.h"

namespace stepflow {

class K8sMetrics : public ReflectorHooks {
public:
    K8sMetrics();  // registers the families once per process, with MetricsRegistry::get().registry()
    void relist() override;
    void watch_restart() override;
    void event(K8sWatchEvent::Type type) override;
    void synced() override;
    void api_error(int status) override;

private:
    prometheus::Counter& restarts_;
    prometheus::Counter& relists_;
    prometheus::Family<prometheus::Counter>& events_;
    prometheus::Gauge& last_sync_;
    prometheus::Family<prometheus::Counter>& errors_;
};

}  // namespace stepflow
