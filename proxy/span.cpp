#include "proxy/span.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <ctime>
#include <mutex>

#include <event2/event.h>

namespace stepflow::trace {
namespace {

struct SharedQueue {
    std::mutex mutex;
    std::condition_variable ready;
    std::vector<SpanData> spans;
    size_t capacity = 2048;
    size_t batch_size = 512;
    bool woken = false;
    std::atomic<uint64_t> dropped{0};

    void push(std::vector<SpanData>& batch) {
        bool wake;
        {
            std::lock_guard lock(mutex);
            size_t room = capacity > spans.size() ? capacity - spans.size() : 0;
            size_t take = std::min(room, batch.size());
            if (take < batch.size()) dropped.fetch_add(batch.size() - take, std::memory_order_relaxed);
            size_t before = spans.size();
            for (size_t i = 0; i < take; ++i) spans.push_back(std::move(batch[i]));
            wake = before < batch_size && spans.size() >= batch_size;  // the exporter waits for a full batch
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
    std::vector<SpanData> spans;
    event* hand_off = nullptr;
    bool scheduled = false;
    void flush() {
        scheduled = false;
        if (!spans.empty()) shared().push(spans);
    }
};
constexpr size_t kHandOffSpans = 256;
thread_local ThreadSpans t_spans;

void on_hand_off(int, short, void*) { t_spans.flush(); }

}  // namespace

uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec);
}

void emit(SpanData&& span) {
    ThreadSpans& ts = t_spans;
    ts.spans.push_back(std::move(span));
    if (!ts.hand_off || ts.spans.size() >= kHandOffSpans) {
        ts.flush();
    } else if (!ts.scheduled) {
        ts.scheduled = true;
        event_active(ts.hand_off, 0, 0);
    }
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

size_t Queue::take(std::vector<SpanData>& out, size_t max, uint64_t wait_ms) {
    auto& q = shared();
    std::unique_lock lock(q.mutex);
    q.ready.wait_for(lock, std::chrono::milliseconds(wait_ms), [&] { return q.woken || q.spans.size() >= q.batch_size; });
    q.woken = false;
    size_t n = std::min(max, q.spans.size());
    for (size_t i = 0; i < n; ++i) out.push_back(std::move(q.spans[i]));
    q.spans.erase(q.spans.begin(), q.spans.begin() + static_cast<ptrdiff_t>(n));
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
    return q.spans.size();
}

uint64_t Queue::dropped() { return shared().dropped.load(std::memory_order_relaxed); }

}  // namespace stepflow::trace
