// Sends finished spans to an OpenTelemetry collector over OTLP, on a thread of its own so no
// event loop ever waits for the collector: batches of up to --otel-bsp-max-export-batch-size
// spans every --otel-bsp-schedule-delay (or sooner when a batch is full), as OTLP/gRPC (a unary
// HTTP/2 call made with nghttp2) or OTLP/HTTP (POST /v1/traces), protobuf-encoded, over TLS for
// https:// endpoints. Failures are retried with exponential backoff; what cannot be sent is
// dropped and counted. docs/tracing.md.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace stepflow {

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

namespace otlp_exporter {
// An ExportTraceServiceRequest (protobuf wire format) of the span `records` (proxy/span.h) under
// one resource and our instrumentation scope, into `out`.
void encode(const std::vector<std::pair<std::string, std::string>>& resource, std::string_view records,
            std::string& out);
void start(const ExporterSettings& settings);
// Sends what is queued, giving up at `limit` (SIGTERM, within the drain); then stops the thread.
void shutdown(std::chrono::milliseconds limit);
}  // namespace otlp_exporter

}  // namespace stepflow
