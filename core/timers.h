// Timeouts for thousands of connections without a libevent event (about 140 bytes) each.
// Entries that wait equally long share a queue: appending at the tail keeps a queue in deadline
// order, so arming, restarting and cancelling are O(1) pointer moves, and one event per queue
// (a handful per loop: one per configured duration) wakes the loop for its earliest deadline.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/config.h"

struct event;
struct event_base;

namespace stepflow {

class Deadline;

// The clock deadlines run on (CLOCK_MONOTONIC_COARSE): a few ns to read, a few ms of resolution.
int64_t coarse_now_us();

class Timers {
public:
    explicit Timers(event_base* base);
    ~Timers();
    Timers(const Timers&) = delete;
    Timers& operator=(const Timers&) = delete;

    event_base* base() const { return base_; }

private:
    friend class Deadline;
    struct Queue;
    Queue& queue_for(int64_t duration_us);
    static void on_fire(int, short, void* arg);
    void schedule(Queue& q, int64_t now);

    event_base* base_;
    std::vector<std::unique_ptr<Queue>> queues_;
};

// One pending timeout, embedded in the object it belongs to. The callback runs from the loop
// once the deadline passes, unless cancelled or re-armed first; it may free the owner.
class Deadline {
public:
    using Callback = void (*)(void* arg);
    Deadline(Callback cb, void* arg) : cb_(cb), arg_(arg) {}
    ~Deadline() { cancel(); }
    Deadline(const Deadline&) = delete;
    Deadline& operator=(const Deadline&) = delete;

    // Fires `after` from now (restarting it if armed); a zero duration cancels.
    void arm(Timers& timers, Millis after);
    // Starts the same wait again from now; nothing when not armed.
    void restart();
    void cancel();
    bool armed() const { return queue_ != nullptr; }

private:
    friend class Timers;
    void append(Timers::Queue& q, int64_t now);
    void unlink();

    Deadline* prev_ = nullptr;
    Deadline* next_ = nullptr;
    Timers::Queue* queue_ = nullptr;
    int64_t at_us_ = 0;
    Callback cb_;
    void* arg_;
};

}  // namespace stepflow
