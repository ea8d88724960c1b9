// W3C Trace Context (traceparent) and the sampling decision, kept apart from the spans they
// lead to so the data path can carry trace ids for log lines even when no span is exported.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace stepflow::trace {

struct Ids {
    uint8_t trace_id[16] = {};
    uint8_t span_id[8] = {};
    uint8_t flags = 0;  // bit 0: sampled
};

// `00-<32 hex>-<16 hex>-<2 hex>` (a later version may append fields after a dash); all-zero ids,
// upper-case hex and version ff are invalid (W3C Trace Context §3.2).
bool parse_traceparent(std::string_view value, Ids& out);
// Writes the 55 characters of a version-00 traceparent.
void format_traceparent(const uint8_t trace_id[16], const uint8_t span_id[8], uint8_t flags, char out[55]);
void to_hex(const uint8_t* bytes, size_t n, char* out);  // 2n lowercase characters, no terminator

// Random non-zero ids from a per-thread generator (no syscall, no lock).
void new_trace_id(uint8_t out[16]);
void new_span_id(uint8_t out[8]);

enum class Sampler { AlwaysOn, AlwaysOff, TraceIdRatio, ParentAlwaysOn, ParentAlwaysOff, ParentTraceIdRatio };
bool parse_sampler(std::string_view name, Sampler& out);
const char* to_string(Sampler s);

// Set once at start-up, read by every loop thread.
struct Settings {
    bool enabled = false;  // spans are made and exported
    Sampler sampler = Sampler::ParentAlwaysOn;
    double ratio = 1.0;
};
void configure(const Settings& s);
const Settings& settings();

// The OpenTelemetry sampling decision for a new span: `parent` is null for a root span.
bool sample(const uint8_t trace_id[16], const Ids* parent);

}  // namespace stepflow::trace
