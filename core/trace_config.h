// Tracing settings: Stepflow's own variables (STEPFLOW_TRACE_ENABLED, STEPFLOW_OTLP_ENDPOINT)
// and the OpenTelemetry SDK's standard ones (OTEL_*), each also a flag. docs/tracing.md.
#pragma once

#include <chrono>
#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "core/trace_context.h"

namespace CLI {
class App;
}

namespace stepflow {

// Where and how the OTLP exporter (proxy/otlp_exporter.h) sends spans.
struct OtlpTarget {
    enum class Protocol { Grpc, HttpProtobuf } protocol = Protocol::Grpc;
    bool tls = false;
    std::string host;
    int port = 4317;
    std::string path;  // HTTP: the request path (/v1/traces); gRPC: unused
    std::vector<std::pair<std::string, std::string>> headers;  // OTEL_EXPORTER_OTLP_HEADERS
    std::string ca_file;  // OTEL_EXPORTER_OTLP_CERTIFICATE; empty: the system CA bundle
};

struct ExporterSettings {
    OtlpTarget target;
    std::vector<std::pair<std::string, std::string>> resource;  // service.name first
    size_t max_queue_size = 2048;
    size_t max_export_batch_size = 512;
    std::chrono::milliseconds schedule_delay{5000};
    std::chrono::milliseconds export_timeout{10000};
};

// Parses an endpoint URL (http:// or https://, host, optional port and path). For gRPC the path
// is ignored; for HTTP an endpoint without a path gets /v1/traces unless `exact_path` (the
// traces-specific variable names the full URL).
bool parse_otlp_endpoint(const std::string& url, OtlpTarget::Protocol protocol, bool exact_path, OtlpTarget& out,
                         std::string& error);

struct TraceConfig {
    trace::Settings sampling;  // .enabled: spans are made and exported
    ExporterSettings exporter;
    bool metrics_enabled = true;  // STEPFLOW_METRICS_ENABLED (accepted; /metrics is always served)
    bool compression_asked = false;  // gzip was asked for: exported uncompressed, said at start-up
};

// The flags as given, before they are checked.
struct TraceFlags {
    std::string trace_enabled, stepflow_endpoint, endpoint, traces_endpoint, protocol = "grpc", headers,
        certificate, timeout, service_name, resource_attributes, sampler, sampler_arg, sdk_disabled,
        bsp_schedule_delay, bsp_export_timeout, bsp_max_queue_size, bsp_max_export_batch_size, metrics_enabled,
        compression;
    // The traces-specific forms, which win over the general ones (as the OpenTelemetry SDKs read them).
    std::string traces_protocol, traces_headers, traces_certificate, traces_timeout, traces_compression;
};

void add_trace_flags(CLI::App& app, TraceFlags& flags);
// Checks the flags into `out`; returns an error naming the flag and its variable, or "".
std::string finish_trace_flags(const TraceFlags& flags, TraceConfig& out);

}  // namespace stepflow
