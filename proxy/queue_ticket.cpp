#include "proxy/queue_ticket.h"

#include "proxy/admission.h"
#include "proxy/metrics.h"
#include "proxy/router.h"
#include "proxy/loop_thread.h"

namespace stepflow {

QueueTicket::Join QueueTicket::join(LoopThread& thread, Exchange* exchange, bool at_front, bool cold_start,
                                     bool retries_spent) {
    // Its queue deadline passed while it was at a worker (or the balancer is draining): a
    // re-queue gets no fresh wait.
    if (expired_ || std::chrono::steady_clock::now() >= thread.queue_cutoff()) return Join::DeadlinePassed;
    AdmissionQueue& queue = AdmissionQueue::get();
    uint64_t ticket = AdmissionQueue::next_ticket();
    if (at_front) {
        queue.push_front(&thread, ticket, retries_spent);
    } else if (!queue.push(&thread, ticket)) {
        return Join::Full;
    }
    ticket_ = ticket;
    thread.wait_for_slot(ticket, exchange);
    waiting_ = true;
    queued_at_ = std::chrono::steady_clock::now();
    // Armed when the request first waits and never restarted: a re-queue after a -32300 waits
    // only for what is left of it (one timer duration, so the thread's timer queues stay few).
    if (!deadline_started_) {
        deadline_started_ = true;
        deadline_.arm(thread.timers(), cold_start ? thread.config().cold_start_timeout : thread.config().queue_timeout);
    }
    // A slot freed between dispatch's look and the push saw an empty queue and offered nothing:
    // offer it now rather than at the next admission tick. A request with its retries spent
    // passes such a slot on to one that may still be refused.
    if (route_least_load(thread.fleet().get(), thread.rng(), {}, true)) {
        if (retries_spent) queue.pass_on();
        else queue.slot_freed();
    }
    return Join::Waiting;
}

double QueueTicket::leave(LoopThread& thread) {
    if (ticket_) {
        AdmissionQueue::get().remove(ticket_);  // false: already handed over; the thread passes it on
        thread.stop_waiting(ticket_);
        ticket_ = 0;
    }
    if (!waiting_) return -1;
    waiting_ = false;
    auto waited = std::chrono::steady_clock::now() - queued_at_;
    double ms = std::chrono::duration<double, std::milli>(waited).count();
    Metrics::get().queue_wait_seconds.Observe(ms / 1000.0);
    return ms;
}

}  // namespace stepflow
