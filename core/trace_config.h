// Tracing settings: Stepflow's own variables (STEPFLOW_TRACE_ENABLED, STEPFLOW_OTLP_ENDPOINT)
// and the OpenTelemetry SDK's standard ones (OTEL_*), each also a flag. docs/tracing.md.
#pragma once

#include <string>

#include "core/trace_context.h"
#include "proxy/otlp_exporter.h"

namespace CLI {
class App;
}

namespace stepflow {

struct TraceConfig {
    trace::Settings sampling;  // .enabled: spans are made and exported
    ExporterSettings exporter;
    bool metrics_enabled = true;  // STEPFLOW_METRICS_ENABLED (accepted; /metrics is always served)
};

// The flags as given, before they are checked.
struct TraceFlags {
    std::string trace_enabled, stepflow_endpoint, endpoint, traces_endpoint, protocol = "grpc", headers,
        certificate, timeout, service_name, resource_attributes, sampler, sampler_arg, sdk_disabled,
        bsp_schedule_delay, bsp_export_timeout, bsp_max_queue_size, bsp_max_export_batch_size, metrics_enabled;
};

void add_trace_flags(CLI::App& app, TraceFlags& flags);
// Checks the flags into `out`; returns an error naming the flag and its variable, or "".
std::string finish_trace_flags(const TraceFlags& flags, TraceConfig& out);

}  // namespace stepflow
