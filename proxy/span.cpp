#include "proxy/span.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <mutex>

#include <event2/event.h>

namespace stepflow::trace {
namespace {

void put(std::string& buf, const void* p, size_t n) { buf.append(static_cast<const char*>(p), n); }

// Grows `buf` by `n` bytes once per entry and returns where they start: one call into
// std::string per entry rather than one per field.
char* grow(std::string& buf, size_t n) {
    size_t at = buf.size();
    buf.resize(at + n);
    return buf.data() + at;
}

char* put_key(char* p, Entry type, std::string_view key) {
    const char* k = key.data();
    *p++ = char(type);
    std::memcpy(p, &k, sizeof k);
    p += sizeof k;
    *p++ = char(uint8_t(std::min<size_t>(key.size(), 255)));
    return p;
}
constexpr size_t kKeyBytes = 1 + sizeof(const char*) + 1;

char* put_text(char* p, std::string_view text) {
    uint32_t n = uint32_t(text.size());
    std::memcpy(p, &n, 4);
    if (n) std::memcpy(p + 4, text.data(), n);
    return p + 4 + n;
}

// Bytes of the first `n` records of `records`.
size_t records_bytes(const std::string& records, size_t n) {
    size_t at = 0;
    for (size_t i = 0; i < n && at < records.size(); ++i) {
        uint32_t size;
        std::memcpy(&size, records.data() + at, 4);
        at += size;
    }
    return at;
}

struct SharedQueue {
    std::mutex mutex;
    std::condition_variable ready;
    std::string records;
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
            if (records.empty() && take == n) records.swap(batch);  // the usual case: no copy
            else records.append(batch.data(), take == n ? batch.size() : records_bytes(batch, take));
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

size_t begin(std::string& buf, const RecordHead& head) {
    size_t at = buf.size();
    put(buf, &head, sizeof head);
    return at;
}

void name(std::string& buf, std::string_view name) {
    char* p = grow(buf, 1 + 4 + name.size());
    *p++ = char(Entry::Name);
    put_text(p, name);
}

void string(std::string& buf, std::string_view key, std::string_view value) {
    put_text(put_key(grow(buf, kKeyBytes + 4 + value.size()), Entry::String, key), value);
}

void int64(std::string& buf, std::string_view key, int64_t value) {
    std::memcpy(put_key(grow(buf, kKeyBytes + 8), Entry::Int, key), &value, 8);
}

void real(std::string& buf, std::string_view key, double value) {
    std::memcpy(put_key(grow(buf, kKeyBytes + 8), Entry::Double, key), &value, 8);
}

void boolean(std::string& buf, std::string_view key, bool value) {
    *put_key(grow(buf, kKeyBytes + 1), Entry::Bool, key) = char(value ? 1 : 0);
}

void status_message(std::string& buf, std::string_view message) {
    char* p = grow(buf, 1 + 4 + message.size());
    *p++ = char(Entry::StatusMessage);
    put_text(p, message);
}

void finish(std::string& buf, size_t at, uint64_t end_ns, bool error) {
    RecordHead head;
    std::memcpy(&head, buf.data() + at, sizeof head);
    head.size = uint32_t(buf.size() - at);
    head.end_ns = end_ns;
    head.error = error;
    std::memcpy(buf.data() + at, &head, sizeof head);
}

}  // namespace record

void write(std::string& buf, const SpanData& s) {
    size_t at = record::begin(buf, s.head);
    record::name(buf, s.name);
    for (auto& a : s.attributes) {
        if (auto v = std::get_if<std::string>(&a.value)) record::string(buf, a.key, *v);
        else if (auto i = std::get_if<int64_t>(&a.value)) record::int64(buf, a.key, *i);
        else if (auto d = std::get_if<double>(&a.value)) record::real(buf, a.key, *d);
        else if (auto b = std::get_if<bool>(&a.value)) record::boolean(buf, a.key, *b);
    }
    if (!s.status_message.empty()) record::status_message(buf, s.status_message);
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
    size_t n = std::min(max, q.count);
    if (n == q.count && out.empty()) {
        out.swap(q.records);  // all of it: the buffers change hands, nothing is copied
        q.records.clear();
    } else {
        size_t bytes = n == q.count ? q.records.size() : records_bytes(q.records, n);
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
