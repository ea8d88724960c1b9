#include "proxy/span.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <ctime>
#include <mutex>
#include <utility>
#include <vector>

#include <event2/event.h>

#include "proxy/otlp_wire.h"

namespace stepflow::trace {
namespace {

namespace wire = otlp_wire;

// What precedes a span's bytes in a record (copied in and out with memcpy: records are unaligned).
struct Prefix {
    uint32_t size = 0;       // bytes of the whole record, this prefix included
    uint32_t end_at = 0;     // offset of end_time_unix_nano's field (written by finish)
    uint32_t status_at = 0;  // offset of the status field, 0: none
    uint32_t flags = 0;      // Span.flags, written last by finish
};

static_assert(offsetof(Prefix, size) == 0, "record_size() (proxy/span.h) reads a record's first four bytes");

Prefix read_prefix(const char* record) {
    Prefix p;
    std::memcpy(&p, record, sizeof p);
    return p;
}
void write_prefix(std::string& buf, size_t at, const Prefix& p) { std::memcpy(buf.data() + at, &p, sizeof p); }

// Grows `buf` by `n` bytes once per field and returns where they start: one call into
// std::string per attribute rather than one per byte.
char* grow(std::string& buf, size_t n) {
    size_t at = buf.size();
    buf.resize(at + n);
    return buf.data() + at;
}

// A Span attribute (field 9) whose AnyValue has `any` bytes: grows the buffer by the whole
// KeyValue and returns where the AnyValue's bytes go.
char* attribute(std::string& buf, std::string_view key, size_t any) {
    size_t k = key.size();
    if (k && k + any + 4 < 0x80) {  // the usual short attribute: every length is one byte
        char* p = grow(buf, 2 + 4 + k + any);
        p[0] = char(9 << 3 | wire::kLen);
        p[1] = char(4 + k + any);
        p[2] = char(1 << 3 | wire::kLen);
        p[3] = char(k);
        wire::copy_bytes(p + 4, key.data(), k);
        p += 4 + k;
        p[0] = char(2 << 3 | wire::kLen);
        p[1] = char(any);
        return p + 2;
    }
    size_t body = wire::key_value_body_size(key, any);
    char* p = grow(buf, 1 + wire::varint_size(body) + body);
    wire::put_key_value_head(p, 9, key, any);
    return p;
}

// Bytes of the first `n` records of `records`.
size_t records_bytes(const std::string& records, size_t n) {
    size_t at = 0;
    for (size_t i = 0; i < n && at < records.size(); ++i) {
        at += record_size(records.data() + at);
    }
    return at;
}

struct SharedQueue {
    std::mutex mutex;
    std::condition_variable ready;
    std::string records;
    // Each hand-off's bytes and spans, in order: take() cuts a batch at their boundaries instead
    // of walking record by record through memory the loop wrote long ago (a cache miss per span).
    std::vector<std::pair<size_t, size_t>> hand_offs;
    size_t count = 0;
    size_t capacity = 2048;
    size_t batch_size = 512;
    bool woken = false;
    std::atomic<uint64_t> dropped{0};

    void push(std::string& batch, size_t n) {
        bool wake;
        {
            std::lock_guard lock(mutex);
            size_t room = capacity > count ? capacity - count : 0;
            size_t take = std::min(room, n);
            if (take < n) dropped.fetch_add(n - take, std::memory_order_relaxed);
            size_t before = count;
            size_t bytes = take == n ? batch.size() : records_bytes(batch, take);
            if (records.empty() && take == n) records.swap(batch);  // the usual case: no copy
            else records.append(batch.data(), bytes);
            if (take) hand_offs.emplace_back(bytes, take);
            count += take;
            wake = before < batch_size && count >= batch_size;  // the exporter waits for a full batch
        }
        batch.clear();
        if (wake) ready.notify_one();
    }
};

SharedQueue& shared() {
    static SharedQueue* q = new SharedQueue;  // leaked: loop threads may end spans while the process exits
    return *q;
}

struct ThreadSpans {
    std::string records;
    size_t count = 0;
    event* hand_off = nullptr;
    bool scheduled = false;
    void flush() {
        scheduled = false;
        if (count) shared().push(records, count);
        records.clear();
        count = 0;
    }
};
constexpr size_t kHandOffSpans = 256;
thread_local ThreadSpans t_spans;

void on_hand_off(int, short, void*) { t_spans.flush(); }

}  // namespace

namespace record {

size_t begin(std::string& buf, const SpanHead& h, std::string_view name) {
    size_t at = buf.size();
    // Protobuf's order: trace_id 1, span_id 2, parent_span_id 4, name 5, kind 6, start 7, end 8;
    // proto3 leaves out empty and zero fields. The end's 8 bytes are written by finish().
    char* p = grow(buf, sizeof(Prefix) + 18 + 10 + 10 + wire::bytes_field_size(5, name.size()) + 2 + 9 + 9);
    char* span = p + sizeof(Prefix);
    char* out = span;
    wire::put_bytes(out, 1, {reinterpret_cast<const char*>(h.trace_id), 16});
    wire::put_bytes(out, 2, {reinterpret_cast<const char*>(h.span_id), 8});
    if (h.has_parent) wire::put_bytes(out, 4, {reinterpret_cast<const char*>(h.parent_span_id), 8});
    if (!name.empty()) wire::put_bytes(out, 5, name);
    if (h.kind != Kind(0)) {
        wire::put_tag(out, 6, wire::kVarint);
        wire::put_varint(out, uint64_t(h.kind));
    }
    if (h.start_ns) {
        wire::put_tag(out, 7, wire::kFixed64);
        wire::put_fixed64(out, h.start_ns);
    }
    Prefix prefix;
    prefix.end_at = uint32_t(out - p);
    wire::put_tag(out, 8, wire::kFixed64);
    out += 8;
    prefix.flags = h.flags | 0x100u;  // bit 8: whether the parent is remote is known ...
    if (h.has_parent && h.kind == Kind::Server) prefix.flags |= 0x200u;  // ... and it is
    std::memcpy(p, &prefix, sizeof prefix);
    buf.resize(at + size_t(out - p));
    return at;
}

void string(std::string& buf, std::string_view key, std::string_view value) {
    size_t n = value.size();
    char* p = attribute(buf, key, wire::string_value_size(n));
    if (n < 0x80) {
        p[0] = char(1 << 3 | wire::kLen);
        p[1] = char(n);
        wire::copy_bytes(p + 2, value.data(), n);
    } else {
        wire::put_bytes(p, 1, value);
    }
}

void int64(std::string& buf, std::string_view key, int64_t value) {
    size_t n = wire::varint_size(uint64_t(value));
    char* p = attribute(buf, key, 1 + n);
    wire::put_tag(p, 3, wire::kVarint);
    wire::put_varint(p, uint64_t(value));
}

void real(std::string& buf, std::string_view key, double value) {
    char* p = attribute(buf, key, 1 + 8);
    wire::put_tag(p, 4, wire::kFixed64);
    uint64_t bits;
    std::memcpy(&bits, &value, 8);
    wire::put_fixed64(p, bits);
}

void boolean(std::string& buf, std::string_view key, bool value) {
    char* p = attribute(buf, key, 2);
    wire::put_tag(p, 2, wire::kVarint);
    *p = char(value ? 1 : 0);
}

void status_message(std::string& buf, size_t at, std::string_view message) {
    Prefix prefix = read_prefix(buf.data() + at);
    prefix.status_at = uint32_t(buf.size() - at);
    write_prefix(buf, at, prefix);
    // Status: message 2, code 3 (ERROR).
    size_t body = wire::bytes_field_size(2, message.size()) + 2;
    char* p = grow(buf, 1 + wire::varint_size(body) + body);
    wire::put_tag(p, 15, wire::kLen);
    wire::put_varint(p, body);
    wire::put_bytes(p, 2, message);
    wire::put_tag(p, 3, wire::kVarint);
    *p = 2;
}

void finish(std::string& buf, size_t at, uint64_t end_ns, bool error) {
    Prefix prefix = read_prefix(buf.data() + at);
    if (end_ns) {
        char* p = buf.data() + at + prefix.end_at + 1;
        wire::put_fixed64(p, end_ns);
    } else {  // proto3 leaves a zero out (only spans written by tests end at 0)
        buf.erase(at + prefix.end_at, 9);
        if (prefix.status_at) prefix.status_at -= 9;
    }
    if (prefix.status_at && !error) buf.resize(at + prefix.status_at);  // the status is the last field
    if (error && !prefix.status_at) {
        char* p = grow(buf, 4);
        wire::put_tag(p, 15, wire::kLen);
        *p++ = 2;
        wire::put_tag(p, 3, wire::kVarint);
        *p = 2;  // STATUS_CODE_ERROR
    }
    char* p = grow(buf, 2 + 4);
    wire::put_tag(p, 16, wire::kFixed32);
    wire::put_fixed32(p, prefix.flags);
    prefix.size = uint32_t(buf.size() - at);
    write_prefix(buf, at, prefix);
}

}  // namespace record

std::string_view span_bytes(const char* record) {
    return {record + sizeof(Prefix), read_prefix(record).size - sizeof(Prefix)};
}

void write(std::string& buf, const SpanData& s) {
    size_t at = record::begin(buf, s.head, s.name);
    for (auto& a : s.attributes) {
        if (auto v = std::get_if<std::string>(&a.value)) record::string(buf, a.key, *v);
        else if (auto i = std::get_if<int64_t>(&a.value)) record::int64(buf, a.key, *i);
        else if (auto d = std::get_if<double>(&a.value)) record::real(buf, a.key, *d);
        else if (auto b = std::get_if<bool>(&a.value)) record::boolean(buf, a.key, *b);
    }
    if (!s.status_message.empty()) record::status_message(buf, at, s.status_message);
    record::finish(buf, at, s.head.end_ns, s.head.error);
}

uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

std::string& thread_records() { return t_spans.records; }

void emitted() {
    ThreadSpans& ts = t_spans;
    ++ts.count;
    if (!ts.hand_off || ts.count >= kHandOffSpans) {
        ts.flush();
    } else if (!ts.scheduled) {
        ts.scheduled = true;
        event_active(ts.hand_off, 0, 0);
    }
}

void emit(std::string_view record) {
    t_spans.records.append(record);
    emitted();
}

void attach_loop(event_base* base) {
    if (!t_spans.hand_off) t_spans.hand_off = event_new(base, -1, 0, on_hand_off, nullptr);
}

void detach_loop() {
    t_spans.flush();
    if (t_spans.hand_off) event_free(t_spans.hand_off);
    t_spans.hand_off = nullptr;
}

void Queue::configure(size_t capacity, size_t batch_size) {
    auto& q = shared();
    std::lock_guard lock(q.mutex);
    q.capacity = capacity;
    q.batch_size = batch_size;
}

size_t Queue::take(std::string& out, size_t max, uint64_t wait_ms) {
    auto& q = shared();
    std::unique_lock lock(q.mutex);
    q.ready.wait_for(lock, std::chrono::milliseconds(wait_ms), [&] { return q.woken || q.count >= q.batch_size; });
    q.woken = false;
    // Whole hand-offs up to `max` spans; only a first hand-off larger than `max` is cut inside.
    size_t n = 0, bytes = 0, whole = 0;
    for (; whole < q.hand_offs.size() && n + q.hand_offs[whole].second <= max; ++whole) {
        bytes += q.hand_offs[whole].first;
        n += q.hand_offs[whole].second;
    }
    q.hand_offs.erase(q.hand_offs.begin(), q.hand_offs.begin() + ptrdiff_t(whole));
    if (whole == 0 && !q.hand_offs.empty() && max > 0) {
        n = max;
        bytes = records_bytes(q.records, n);
        q.hand_offs.front().first -= bytes;
        q.hand_offs.front().second -= n;
    }
    if (out.empty()) {
        // The buffers change hands; what is left (a few hand-offs' worth) is copied back.
        out.swap(q.records);
        q.records.clear();
        if (bytes < out.size()) {
            q.records.append(out, bytes);
            out.resize(bytes);
        }
    } else {
        out.append(q.records.data(), bytes);
        q.records.erase(0, bytes);
    }
    q.count -= n;
    return n;
}

void Queue::wake() {
    auto& q = shared();
    {
        std::lock_guard lock(q.mutex);
        q.woken = true;
    }
    q.ready.notify_all();
}

size_t Queue::size() {
    auto& q = shared();
    std::lock_guard lock(q.mutex);
    return q.count;
}

uint64_t Queue::dropped() { return shared().dropped.load(std::memory_order_relaxed); }

}  // namespace stepflow::trace
