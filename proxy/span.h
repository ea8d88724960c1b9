// Finished spans on their way to the exporter. A loop thread collects the spans it ends in a
// per-thread buffer handed to the exporter's bounded queue once per loop turn (or when large):
// one lock per turn, never a wake-up per span. A full queue drops the batch and counts it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

struct event_base;

namespace stepflow::trace {

enum class Kind : uint8_t { Internal = 1, Server = 2, Client = 3 };

using Value = std::variant<std::string, int64_t, double, bool>;
struct Attribute {
    std::string_view key;  // a literal: attribute names are fixed
    Value value;
};
struct Event {
    std::string_view name;
    uint64_t time_ns = 0;
    std::vector<Attribute> attributes;
};

struct SpanData {
    uint8_t trace_id[16] = {};
    uint8_t span_id[8] = {};
    uint8_t parent_span_id[8] = {};
    bool has_parent = false;
    uint8_t flags = 1;
    Kind kind = Kind::Internal;
    std::string name;
    uint64_t start_ns = 0, end_ns = 0;  // unix nanoseconds
    bool error = false;
    std::string status_message;
    std::vector<Attribute> attributes;
    std::vector<Event> events;
};

uint64_t now_ns();  // unix time in nanoseconds

// Queues a finished span for export (sampled spans only reach here).
void emit(SpanData&& span);
// As log::attach_loop: a loop thread's spans leave once per loop turn.
void attach_loop(event_base* base);
void detach_loop();

// The exporter's side of the queue.
struct Queue {
    // Sets the capacity (OTEL_BSP_MAX_QUEUE_SIZE) and the batch size that wakes the exporter.
    static void configure(size_t capacity, size_t batch_size);
    // Takes up to `max` spans, waiting until `batch_size` are queued, `wait_ns` passed or
    // wake() was called. Returns what it took (maybe none).
    static size_t take(std::vector<SpanData>& out, size_t max, uint64_t wait_ms);
    static void wake();
    static size_t size();
    static uint64_t dropped();  // spans dropped because the queue was full
};

}  // namespace stepflow::trace
