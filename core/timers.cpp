#include "core/timers.h"

#include <algorithm>
#include <ctime>

#include <event2/event.h>

namespace stepflow {

struct Timers::Queue {
    Timers* owner;
    int64_t duration_us;
    Deadline* head = nullptr;
    Deadline* tail = nullptr;
    event* ev = nullptr;
    bool scheduled = false;
};

Timers::Timers(event_base* base) : base_(base) {}

Timers::~Timers() {
    for (auto& q : queues_) {
        // Owners outlive nothing here, but leave their entries consistent all the same.
        while (q->head) q->head->cancel();
        event_free(q->ev);
    }
}

// The clock libevent's timers run on (CLOCK_MONOTONIC_COARSE on Linux), read directly: a vDSO
// read with no system call. event_gettime_monotonic() reads the same clock but takes the base's
// lock around it, and deadlines read the clock several times per request. Only differences of
// these readings are handed to libevent, so the two never need to agree on an origin; a timer
// that fires a tick early finds nothing due and is scheduled again.
int64_t coarse_now_us() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return int64_t(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
}

Timers::Queue& Timers::queue_for(int64_t duration_us) {
    for (auto& q : queues_)
        if (q->duration_us == duration_us) return *q;
    auto q = std::make_unique<Queue>();
    q->owner = this;
    q->duration_us = duration_us;
    q->ev = evtimer_new(base_, on_fire, q.get());
    queues_.push_back(std::move(q));
    return *queues_.back();
}

void Timers::schedule(Queue& q, int64_t now) {
    int64_t wait = std::max<int64_t>(0, q.head->at_us_ - now);
    timeval tv{static_cast<time_t>(wait / 1000000), static_cast<suseconds_t>(wait % 1000000)};
    evtimer_add(q.ev, &tv);
    q.scheduled = true;
}

void Timers::on_fire(int, short, void* arg) {
    auto& q = *static_cast<Queue*>(arg);
    q.scheduled = false;
    int64_t now = coarse_now_us();
    // A callback may arm, cancel or free any entry, this queue's included: re-read the head.
    while (q.head && q.head->at_us_ <= now) {
        Deadline* due = q.head;
        due->unlink();
        due->cb_(due->arg_);
    }
    if (q.head && !q.scheduled) q.owner->schedule(q, now);
}

void Deadline::arm(Timers& timers, Millis after) {
    if (after.count() <= 0) return cancel();
    Timers::Queue& q = timers.queue_for(int64_t(after.count()) * 1000);
    if (queue_) unlink();
    append(q, coarse_now_us());
}

void Deadline::restart() {
    if (!queue_) return;
    Timers::Queue& q = *queue_;
    int64_t now = coarse_now_us();
    if (q.tail == this && at_us_ >= now + q.duration_us) return;  // already at the back
    unlink();
    append(q, now);
}

void Deadline::cancel() {
    // The queue's event may stay scheduled for this entry; it then wakes once, finds nothing
    // due and sleeps until the new head.
    if (queue_) unlink();
}

void Deadline::append(Timers::Queue& q, int64_t now) {
    // Equal durations keep the queue sorted; a clock read that went backwards must not break it.
    at_us_ = std::max(now + q.duration_us, q.tail ? q.tail->at_us_ : 0);
    queue_ = &q;
    prev_ = q.tail;
    next_ = nullptr;
    if (q.tail) q.tail->next_ = this;
    else q.head = this;
    q.tail = this;
    if (!q.scheduled) q.owner->schedule(q, now);
}

void Deadline::unlink() {
    Timers::Queue& q = *queue_;
    if (prev_) prev_->next_ = next_;
    else q.head = next_;
    if (next_) next_->prev_ = prev_;
    else q.tail = prev_;
    prev_ = next_ = nullptr;
    queue_ = nullptr;
}

}  // namespace stepflow
