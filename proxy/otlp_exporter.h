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

#include "core/trace_config.h"

namespace stepflow {
namespace otlp_exporter {
// An ExportTraceServiceRequest (protobuf wire format) of the span `records` (proxy/span.h) under
// one resource and our instrumentation scope, written into `out`: the request is the returned
// view, which starts a little after out's beginning.
std::string_view encode(const std::vector<std::pair<std::string, std::string>>& resource, std::string_view records,
                        std::string& out);
// What an ExportTraceServiceResponse says about spans the collector refused although the
// export succeeded (OTLP's partial success: the request must not be sent again).
struct PartialSuccess {
    int64_t rejected_spans = 0;
    std::string error_message;
};
// Reads a response's protobuf bytes; false when they are not an ExportTraceServiceResponse.
bool decode_response(std::string_view bytes, PartialSuccess& out);
// A Retry-After value (RFC 9110 §10.2.3): delta-seconds, or an HTTP-date turned into the wait
// from `now` (0 once it has passed); 0 when it is absent or neither.
std::chrono::seconds retry_after(std::string_view value,
                                 std::chrono::system_clock::time_point now = std::chrono::system_clock::now());
// gRPC's form of it: the google.rpc.RetryInfo delay in a grpc-status-details-bin trailer (base64
// of a google.rpc.Status), rounded up to whole seconds; 0 when there is none.
std::chrono::seconds grpc_retry_delay(std::string_view status_details_base64);
// Why a collector refused an export, for the log: the message of the google.rpc.Status an
// OTLP/HTTP error answer carries ("" if none). (gRPC's grpc-message is percent_decode'd.)
std::string status_message(std::string_view status_bytes);
void start(const ExporterSettings& settings);
// Sends what is queued, giving up at `limit` (SIGTERM, within the drain); then stops the thread.
void shutdown(std::chrono::milliseconds limit);
}  // namespace otlp_exporter
}  // namespace stepflow
