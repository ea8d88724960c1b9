// The queue of new work waiting for a free slot, shared by every event-loop thread. Entries are
// tickets (a number and the thread that holds the request); the request itself never leaves its
// thread. When a slot frees anywhere, the oldest ticket is handed to its thread, which tries to
// dispatch it (and puts it back at the head if another request took the slot first), so no
// thread's waiters starve while another thread has room.
#pragma once

#include <atomic>
#include <chrono>
#include <string_view>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>

namespace stepflow {

class LoopThread;

inline int64_t steady_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// The capacity in an ORCA-style load report header (Envoy's endpoint-load-metrics, TEXT form):
// "TEXT named_metrics.capacity=4, named_metrics.inflight=3"; ':' is accepted for '=' (older
// Envoy). 0 when the header names no positive capacity.
int load_report_capacity(std::string_view value);

class AdmissionQueue {
public:
    static AdmissionQueue& get();
    void configure(size_t capacity) { capacity_ = capacity; }

    size_t depth() const { return depth_.load(std::memory_order_relaxed); }
    static uint64_t next_ticket();

    // False when the queue is full (or has no room at all: --queue-size 0).
    bool push(LoopThread* thread, uint64_t ticket);
    // Back at the head: woken, but the slot was taken before it got there. `retries_spent`: it
    // may be refused no more (docs/admission.md), so it declines a slot on a refusing instance.
    void push_front(LoopThread* thread, uint64_t ticket, bool retries_spent = false);
    // False when the ticket is not queued (already handed to its thread).
    bool remove(uint64_t ticket);
    // A slot freed (or a limit grew): hands the oldest ticket to its thread. Any thread.
    void slot_freed();
    // A slot declined by a request whose retries are spent: handed to the oldest ticket that may
    // still take it, if any (never back to those that declined, which would spin).
    void pass_on();

private:
    struct Entry {
        LoopThread* thread;
        uint64_t ticket;
        bool retries_spent;
    };
    std::mutex mutex_;  // taken only while requests wait (depth() > 0) or join the queue
    std::deque<Entry> entries_;
    std::atomic<size_t> depth_{0};
    size_t capacity_ = 1024;
};

}  // namespace stepflow
