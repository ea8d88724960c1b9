// Finished spans on their way to the exporter, as compact records: a fixed head (ids, times,
// kind, flags, error) and then entries (the name, the attributes in order, the status message),
// strings as length-prefixed bytes, attribute keys by the address of their literal. A loop thread
// writes the records of the spans it ends straight into a per-thread buffer, handed to the
// exporter's bounded queue once per loop turn (or when large): one lock and one copy per turn,
// no allocation per span or attribute. A full queue drops the records and counts them. The
// exporter encodes OTLP straight from the records (proxy/otlp_exporter.cpp).
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

// The fixed part of a record (copied in and out with memcpy: records are unaligned bytes).
struct RecordHead {
    uint32_t size = 0;  // bytes of the whole record, this head included
    uint8_t trace_id[16] = {};
    uint8_t span_id[8] = {};
    uint8_t parent_span_id[8] = {};
    uint8_t flags = 1;
    Kind kind = Kind::Internal;
    bool has_parent = false;
    bool error = false;
    uint64_t start_ns = 0, end_ns = 0;  // unix nanoseconds
};

enum class Entry : uint8_t { Name = 1, String = 2, Int = 3, Double = 4, Bool = 5, StatusMessage = 6 };

// Writing one record at the end of a buffer: begin(), the name, the attributes in the order
// they are to be exported, at most one status message (last), then finish().
namespace record {
size_t begin(std::string& buf, const RecordHead& head);  // returns where the record starts
void name(std::string& buf, std::string_view name);
// Keys must outlive the record's export: they are literals (stored by address).
void string(std::string& buf, std::string_view key, std::string_view value);
void int64(std::string& buf, std::string_view key, int64_t value);
void real(std::string& buf, std::string_view key, double value);
void boolean(std::string& buf, std::string_view key, bool value);
void status_message(std::string& buf, std::string_view message);
void finish(std::string& buf, size_t at, uint64_t end_ns, bool error);
}  // namespace record

// One entry of a record as read back (the exporter's side).
struct EntryView {
    Entry type{};
    std::string_view key, text;  // text: Name, String, StatusMessage
    int64_t i = 0;
    double d = 0;
    bool b = false;
};
// Reads the entry at `p` (after the head) and moves `p` past it.
inline void read_entry(const char*& p, EntryView& e) {
    e.type = Entry(uint8_t(*p++));
    e.key = {};
    if (e.type != Entry::Name && e.type != Entry::StatusMessage) {
        const char* k;
        std::memcpy(&k, p, sizeof k);
        e.key = {k, uint8_t(p[sizeof k])};
        p += sizeof k + 1;
    }
    switch (e.type) {
    case Entry::Name:
    case Entry::String:
    case Entry::StatusMessage: {
        uint32_t n;
        std::memcpy(&n, p, 4);
        e.text = {p + 4, n};
        p += 4 + n;
        break;
    }
    case Entry::Int:
        std::memcpy(&e.i, p, 8);
        p += 8;
        break;
    case Entry::Double:
        std::memcpy(&e.d, p, 8);
        p += 8;
        break;
    case Entry::Bool:
        e.b = *p++ != 0;
        break;
    }
}

inline RecordHead read_head(const char* record) {
    RecordHead head;
    std::memcpy(&head, record, sizeof head);
    return head;
}

// A span spelled out, written as a record in one go (tests, and any span built in one place).
using Value = std::variant<std::string, int64_t, double, bool>;
struct Attribute {
    std::string_view key;  // a literal: attribute names are fixed
    Value value;
};
struct SpanData {
    RecordHead head;
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
