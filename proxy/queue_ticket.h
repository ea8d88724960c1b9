// A request's place in the admission queue (docs/admission.md): its ticket, and the one queue
// deadline it has, armed at its first wait and kept across re-queues (a deadline, not a
// per-stay timeout).
#pragma once

#include <chrono>
#include <cstdint>

#include "core/timers.h"

namespace stepflow {

class Exchange;
class LoopThread;

class QueueTicket {
public:
    // `on_deadline(arg)` runs when the queue deadline passes.
    QueueTicket(Deadline::Callback on_deadline, void* arg) : deadline_(on_deadline, arg) {}

    enum class Join {
        Waiting,         // queued: the thread calls Exchange::slot_offered when a slot frees
        Full,            // --queue-size requests wait already
        DeadlinePassed,  // passed while the request was at a worker, or the balancer drains
    };
    // `cold_start`: arrived while no instance took new work; the deadline is then
    // --cold-start-timeout instead of --queue-timeout. `retries_spent`: refused with no retry
    // left, it waits for an instance that answers again and is never a refusing one's probe.
    Join join(LoopThread& thread, Exchange* exchange, bool at_front, bool cold_start, bool retries_spent);
    // The queue handed the ticket over (a slot is offered): no longer in the queue.
    void handed_over() { ticket_ = 0; }
    // Ends the place in the queue (dispatched, timed out, or cancelled). Returns the time waited
    // in milliseconds since it joined, or a negative value when it was not waiting.
    double leave(LoopThread& thread);
    // The deadline passed while the request was not waiting: only a later re-queue is refused.
    void expire() { expired_ = true; }
    void cancel_deadline() { deadline_.cancel(); }

    bool queued() const { return ticket_ != 0; }  // in the queue (not yet handed over)
    bool waiting() const { return waiting_; }      // in the queue now, or being offered a slot

private:
    uint64_t ticket_ = 0;  // nonzero while queued
    bool waiting_ = false;
    bool deadline_started_ = false;
    bool expired_ = false;
    std::chrono::steady_clock::time_point queued_at_{};
    Deadline deadline_;
};

}  // namespace stepflow
