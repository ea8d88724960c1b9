// Finished spans on their way to the exporter, as records: a small prefix for the queue (the
// record's size) and then the span itself as OTLP Span bytes (protobuf wire format, fields in
// number order as protobuf writes them), so the exporter only wraps them in the request and
// encodes nothing per span or attribute (proxy/otlp_exporter.cpp). A loop thread writes the
// records of the spans it ends straight into a per-thread buffer, handed to the exporter's bounded
// queue once per loop turn (or when large): one lock and one copy per turn, no allocation per span
// or attribute. A full queue drops the records and counts them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

struct event_base;

namespace stepflow::trace {

enum class Kind : uint8_t { Internal = 1, Server = 2, Client = 3 };

// What a span starts with; end_ns and error are given to record::finish (SpanData keeps them).
struct SpanHead {
    uint8_t trace_id[16] = {};
    uint8_t span_id[8] = {};
    uint8_t parent_span_id[8] = {};
    uint8_t flags = 1;  // W3C trace flags
    Kind kind = Kind::Internal;
    bool has_parent = false;
    bool error = false;
    uint64_t start_ns = 0, end_ns = 0;  // unix nanoseconds
};

// Writing one record at the end of a buffer: begin() (ids, name, kind, start), the attributes in
// the order they are to be exported, at most one status message (last), then finish().
// Strings become protobuf strings and must be UTF-8 (a collector that checks refuses the whole
// export otherwise): the caller's to ensure. RequestTrace::begin makes a client's path and
// headers so; names and status messages are the balancer's own text.
namespace record {
size_t begin(std::string& buf, const SpanHead& head, std::string_view name);  // returns where it starts
void string(std::string& buf, std::string_view key, std::string_view value);
void int64(std::string& buf, std::string_view key, int64_t value);
void real(std::string& buf, std::string_view key, double value);
void boolean(std::string& buf, std::string_view key, bool value);
// The span's status message (exported with the error status; dropped if finish() says no error).
void status_message(std::string& buf, size_t at, std::string_view message);
void finish(std::string& buf, size_t at, uint64_t end_ns, bool error);
}  // namespace record

// Reading records back (the queue and the exporter): the whole record's size, and the Span bytes.
inline uint32_t record_size(const char* record) {
    uint32_t size;  // a record starts with its size
    std::memcpy(&size, record, 4);
    return size;
}
std::string_view span_bytes(const char* record);

// A span spelled out, written as a record in one go (tests, and any span built in one place).
using Value = std::variant<std::string, int64_t, double, bool>;
struct Attribute {
    std::string_view key;
    Value value;
};
struct SpanData {
    SpanHead head;
    std::string name;
    std::vector<Attribute> attributes;
    std::string status_message;
};
void write(std::string& buf, const SpanData& span);

uint64_t now_ns();  // unix time in nanoseconds

// The calling thread's buffer of finished records: write a record at its end with record::*,
// then call emitted() (sampled spans only).
std::string& thread_records();
void emitted();
// Appends a record written elsewhere (an attempt's, built while it ran) and hands it on as emitted().
void emit(std::string_view record);
// As log::attach_loop: a loop thread's spans leave once per loop turn.
void attach_loop(event_base* base);
void detach_loop();

// The exporter's side of the queue.
struct Queue {
    // Sets the capacity in spans (OTEL_BSP_MAX_QUEUE_SIZE) and the batch size that wakes the exporter.
    static void configure(size_t capacity, size_t batch_size);
    // Takes up to `max` span records (appended to `out`), waiting until `batch_size` are queued,
    // `wait_ms` passed or wake() was called. Returns how many it took (maybe none).
    static size_t take(std::string& out, size_t max, uint64_t wait_ms);
    static void wake();
    static size_t size();
    static uint64_t dropped();  // spans dropped because the queue was full
};

}  // namespace stepflow::trace
