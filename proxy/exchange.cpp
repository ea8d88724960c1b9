#include "proxy/exchange.h"

#include <cerrno>
#include <cstring>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include "proxy/conn.h"
#include <event2/event.h>

#include "proxy/admission.h"
#include "proxy/demand.h"
#include "proxy/local_response.h"
#include "proxy/log.h"
#include "proxy/router.h"
#include "proxy/sessions.h"
#include "proxy/worker.h"

namespace stepflow {
namespace {

constexpr size_t kMaxResponseHead = 256 * 1024;
constexpr size_t kSinkHighWater = 256 * 1024;
// Interim (1xx) responses relayed for one request: a worker sends one or two (100 Continue, 103
// Early Hints); an endless stream of them would hold the exchange open without a response.
constexpr int kMaxInterimResponses = 16;

void append_header(std::string& out, std::string_view name, std::string_view value) {
    out.append(name);
    out.append(": ");
    out.append(value);
    out.append("\r\n");
}

}  // namespace

Exchange::Exchange(Worker& worker, Downstream& downstream, const http1::Head& request, const std::string& client_ip,
                   bool client_tls)
    : worker_(worker), downstream_(downstream), request_(request), client_ip_(client_ip),
      pending_(std::make_unique<Pending>(this)), client_tls_(client_tls) {
    request_chunked_ = request_.framing == http1::Framing::Chunked;
    request_done_ = request_.framing == http1::Framing::None;
    pending_->repeatable = may_repeat(request_, worker_.config().trust_idempotency_key);
}

Exchange::~Exchange() {
    abort();
    if (replay_) evbuffer_free(replay_);
}

RouteOutcome Exchange::route() {
    const Fleet& fleet = worker_.fleet().get();
    auto& metrics = Metrics::get();
    count_mcp_method();
    if (worker_.sessions()) {
        RouteOutcome outcome;
        if (route_session(fleet, outcome)) return outcome;
    }
    std::string_view pin = request_.get(worker_.config().instance_header);
    if (!pin.empty()) {
        // Pinned work bypasses capacity and the queue: an execution waiting on its callback
        // answer must never wait behind new work queued for its own slot.
        decision_ = Decision::Pinned;
        stepflow::PinnedMiss why{};
        Instance* inst = route_pinned(fleet, pin, why);
        if (!inst) {
            metrics.pinned_misses[size_t(why)]->Increment();
            return {RouteOutcome::Refused,
                    why == stepflow::PinnedMiss::UnknownInstance ? Failure::PinnedUnknown : Failure::PinnedNotServing,
                    std::string(pin), {}};
        }
        metrics.routing_decisions[size_t(Decision::Pinned)]->Increment();
        if (!connect_to(inst->shared_from_this())) {
            metrics.pinned_misses[size_t(stepflow::PinnedMiss::ConnectFailed)]->Increment();
            return {RouteOutcome::Refused, Failure::SocketFailed, std::string(pin), {}};
        }
        return {};
    }
    decision_ = Decision::LeastLoad;
    if (!route_least_load(fleet, worker_.rng())) {
        // No instance takes new work: a fleet at zero waking up, or a bad rollout. The request
        // waits in the queue for the first instance to become routable (docs/autoscaling.md).
        if (worker_.config().cold_start_timeout.count() == 0) {
            decision_ = Decision::None;
            metrics.no_healthy_instance.Increment();
            return {RouteOutcome::Refused, Failure::NoInstance, {}, {}};
        }
        pending_->cold_start = true;
    }
    metrics.routing_decisions[size_t(Decision::LeastLoad)]->Increment();
    routing_ = true;
    bool going = dispatch(false);
    routing_ = false;
    if (pending_ && pending_->cold_start && going && pending_->ticket) DemandSignal::get().held_on_empty_fleet();
    if (!going && !refused_set_) {
        refused_ = Failure::QueueFull;
        refused_set_ = true;
        metrics.queue_rejections[0]->Increment();
    }
    if (refused_set_) return {RouteOutcome::Refused, refused_, {}, {}};
    return {};
}

// Sends new work to the least-loaded instance with a free slot (never one tried already), or
// queues it. False only when the queue is full. Work arriving while others wait joins the queue
// behind them (first come, first served), unless the queue itself offers the slot.
bool Exchange::dispatch(bool from_queue) {
    const Fleet& fleet = worker_.fleet().get();
    if (!from_queue && AdmissionQueue::get().depth() > 0) return enqueue(false);
    while (pending_->tried_count < kMaxAttempts) {
        Instance* inst = route_least_load(fleet, worker_.rng(), {pending_->tried.data(), pending_->tried_count}, true);
        if (!inst) break;
        if (pending_->retries_spent && inst->capacity.refusals() > 0) {
            pending_->tried[pending_->tried_count++] = inst;  // no more refusals for it: never a probe
            continue;
        }
        if (!inst->capacity.try_take()) continue;  // another thread took the last slot: look again
        admitted_ = true;
        pending_->tried[pending_->tried_count++] = inst;
        connect_to(inst->shared_from_this());
        return true;
    }
    if (finished_) return true;
    if (pending_->tried_count > 0 && !pending_->retries_spent &&
        !route_least_load(fleet, worker_.rng(), {pending_->tried.data(), pending_->tried_count}, false)) {
        exhausted_ = true;  // every instance taking new work was tried: waiting would not help
        return true;
    }
    return enqueue(from_queue);
}

bool Exchange::enqueue(bool at_front) {
    if (pending_->queue_expired || std::chrono::steady_clock::now() >= worker_.queue_cutoff()) {
        // Its queue deadline passed while it was at a worker (or the balancer is draining): a
        // re-queue gets no fresh wait.
        Metrics::get().queue_rejections[1]->Increment();
        give_up(Failure::QueueTimeout, "queue deadline passed");
        return true;
    }
    AdmissionQueue& queue = AdmissionQueue::get();
    uint64_t ticket = AdmissionQueue::next_ticket();
    if (at_front) {
        queue.push_front(&worker_, ticket, pending_->retries_spent);
    } else if (!queue.push(&worker_, ticket)) {
        return false;
    }
    pending_->ticket = ticket;
    worker_.wait_for_slot(ticket, this);
    pending_->waiting = true;
    pending_->queued_at = std::chrono::steady_clock::now();
    // Armed when the request first waits and never restarted: a re-queue after a -32300 waits
    // only for what is left of it (one timer duration, so the thread's timer queues stay few).
    if (!pending_->queue_deadline_started) {
        pending_->queue_deadline_started = true;
        pending_->queue_deadline.arm(worker_.timers(), pending_->cold_start ? worker_.config().cold_start_timeout
                                                                            : worker_.config().queue_timeout);
    }
    // A slot freed between dispatch's look and the push saw an empty queue and offered nothing:
    // offer it now rather than at the next admission tick.
    // A request with its retries spent passes such a slot on to one that may still be refused.
    if (route_least_load(worker_.fleet().get(), worker_.rng(), {}, true)) {
        if (pending_->retries_spent) queue.pass_on();
        else queue.slot_freed();
    }
    return true;
}

// Ends this request's place in the queue (dispatched, timed out, or cancelled).
void Exchange::leave_queue() {
    if (!pending_) return;
    if (pending_->ticket) {
        AdmissionQueue::get().remove(pending_->ticket);  // false: already handed over; the thread passes it on
        worker_.stop_waiting(pending_->ticket);
        pending_->ticket = 0;
    }
    if (pending_->waiting) {
        pending_->waiting = false;
        auto waited = std::chrono::steady_clock::now() - pending_->queued_at;
        double ms = std::chrono::duration<double, std::milli>(waited).count();
        queue_wait_ms_ += ms;
        Metrics::get().queue_wait_seconds.Observe(ms / 1000.0);
        note_queue_wait(ms);
    }
}

void Exchange::note_queue_wait(double ms) {
    if (!trace_ || !trace_->recording) return;
    uint64_t now = trace::now_ns();
    trace_->note_queue_wait(now - uint64_t(ms * 1e6), now);
}

void Exchange::slot_offered() {
    log::Scope ids(correlation());
    if (!pending_) return;
    pending_->ticket = 0;  // handed over: no longer in the queue
    if (finished_) return;
    pending_->tried_count = 0;  // a slot freed since: every instance may be tried again
    if (dispatch(true) && pending_ && pending_->ticket == 0 && !finished_) {
        leave_queue();
        // Room left where this one went (an unlimited instance, or a fleet just woken up): the
        // next in line goes too, without waiting for a request to end or the admission tick.
        if (admitted_ && instance_ && instance_->capacity.has_room()) offer_queued_work();
    }
}

void Exchange::on_queue_timeout(void* arg) {
    auto* self = static_cast<Exchange*>(arg);
    log::Scope ids(self->correlation());
    if (!self->pending_->waiting) {
        self->pending_->queue_expired = true;  // at a worker now: only a later re-queue is refused
        return;
    }
    if (self->pending_->cold_start && !route_least_load(self->worker_.fleet().get(), self->worker_.rng())) {
        self->leave_queue();
        DemandSignal::get().cold_start_timeouts.Increment();
        Metrics::get().no_healthy_instance.Increment();
        self->fail(Failure::NoInstance, "no instance became routable within --cold-start-timeout");
        return;
    }
    self->queue_timed_out("no slot freed within --queue-timeout");
}

void Exchange::queue_timed_out(const char* why) {
    leave_queue();
    Metrics::get().queue_rejections[1]->Increment();
    fail(Failure::QueueTimeout, why);
}

void Exchange::count_mcp_method() {
    std::string_view method = request_.get("Mcp-Method");
    if (!method.empty()) SessionMetrics::get().mcp_requests[mcp_method_index(method)]->Increment();
}

// A request naming a session goes to the instance holding it. True when the session decided
// the outcome (routed, or answered here); false when the request goes by least load: it names no
// session, or one never learned (the backend then answers for itself).
bool Exchange::route_session(const Fleet& fleet, RouteOutcome& outcome) {
    const Sessions& sessions = *worker_.sessions();
    size_t first = 0;
    int named = sessions.count_in(request_.headers, first);
    if (named == 0) return false;
    if (named > 1) {
        // Only one could be unsealed or looked up; the others would reach the worker as sent.
        Metrics::get().rejected_requests.Increment();
        outcome = {RouteOutcome::Refused, Failure::SessionAmbiguous, {}, {}};
        return true;
    }
    pending_->session_header = sessions.match(request_.headers[first].name);
    pending_->session_value = request_.headers[first].value;
    thread_local std::string instance_id;  // scratch: no allocation per request once warm
    auto& metrics = SessionMetrics::get();
    if (sessions.sealer) {
        OpenedSession opened;
        UnsealResult r = sessions.sealer->unseal(pending_->session_value, instance_id, pending_->backend_session, &opened);
        if (r != UnsealResult::Ok) {
            bool expired = r == UnsealResult::Expired;
            metrics.not_found[size_t(expired ? SessionMiss::Expired : SessionMiss::InvalidSeal)]->Increment();
            log::debug(expired ? "session id past --session-max-age" : "session id does not unseal",
                       {{"session", session_log_hash(pending_->session_value)}});
            outcome = {RouteOutcome::Refused, Failure::SessionNotFound, {}, {}};
            return true;
        }
        pending_->session_unsealed = true;
        pending_->session_stale = opened.stale;
        pending_->session_issued_at = opened.issued_at;
    } else if (!sessions.table->lookup(pending_->session_value, instance_id)) {
        return false;
    }
    decision_ = Decision::Pinned;
    stepflow::PinnedMiss why{};
    Instance* inst = route_pinned(fleet, instance_id, why);
    Instance* known = inst ? inst : fleet.find(instance_id);
    if (!inst && (!known || known->membership.load(std::memory_order_relaxed) == Membership::Gone)) {
        // The instance that minted the session left discovery or restarted (a new id): nobody
        // else knows the session, and a 404 makes an MCP client start a new one rather than wait.
        // One still discovered but unhealthy keeps its sessions: a retryable 503 below, so a
        // short illness (slow health checks under load) does not end them.
        metrics.not_found[size_t(SessionMiss::InstanceGone)]->Increment();
        log::debug("session's instance is gone",
                   {{"session", session_log_hash(pending_->session_value)}, {"instance", instance_id}});
        if (sessions.table) sessions.table->forget(pending_->session_value);
        outcome = {RouteOutcome::Refused, Failure::SessionNotFound, {}, {}};
        return true;
    }
    // The answers below never name the instance: with sealed ids the client is not told it.
    auto& m = Metrics::get();
    if (!inst) {
        m.pinned_misses[size_t(why)]->Increment();
        outcome = {RouteOutcome::Refused,
                   why == stepflow::PinnedMiss::UnknownInstance ? Failure::PinnedUnknown : Failure::PinnedNotServing, {}, {}};
        return true;
    }
    m.routing_decisions[size_t(Decision::Pinned)]->Increment();
    if (!connect_to(inst->shared_from_this())) {
        m.pinned_misses[size_t(stepflow::PinnedMiss::ConnectFailed)]->Increment();
        outcome = {RouteOutcome::Refused, Failure::SocketFailed, {}, {}};
    }
    return true;
}

// A session header in the response: learned mode remembers it; sealed mode hands the client a
// sealed id instead of the backend's. A DELETE answered 2xx ends the session.
void Exchange::take_response_session(const http1::Header& h, const Instance& inst, std::vector<http1::Header>& out) {
    const Sessions& sessions = *worker_.sessions();
    if (sessions.sealer) {
        if (pending_->session_unsealed && h.value == pending_->backend_session) {
            if (!pending_->session_stale) {
                out.push_back({h.name, pending_->session_value});  // the client's own sealed id still holds
                return;
            }
            reseal_session(inst);  // opened with an older key: hand back the same session under the current one
            if (!pending_->sealed_session.empty()) out.push_back({h.name, pending_->sealed_session});
            return;
        }
        pending_->sealed_session = sessions.sealer->seal(inst.id, h.value);
        SessionMetrics::get().learned->Increment();
        out.push_back({h.name, pending_->sealed_session});
        return;
    }
    if (h.value != pending_->session_value) SessionMetrics::get().learned->Increment();
    sessions.table->remember(h.value, inst.id);
    out.push_back(h);
}

void Exchange::reseal_session(const Instance& inst) {
    // Keeps the original issue time, so re-sealing never extends --session-max-age.
    pending_->sealed_session = worker_.sessions()->sealer->seal(inst.id, pending_->backend_session, pending_->session_issued_at);
    if (!pending_->sealed_session.empty()) SessionMetrics::get().resealed->Increment();
}

bool Exchange::connect_to(const InstancePtr& inst, bool fresh) {
    instance_ = inst;
    attempt_.start(trace_, *inst, decision_ != Decision::Pinned ? "least-load" : pending_->session_header ? "pinned-session" : "pinned-header");
    inst->in_flight.fetch_add(1, std::memory_order_relaxed);
    in_flight_counted_ = true;
    conn_ = worker_.pool().acquire(inst, this, fresh);
    if (!conn_ && decision_ == Decision::Pinned && !pending_->pinned_retried) {
        // Our shortage must not end a pinned step: free an idle pooled connection (a descriptor)
        // and try once more.
        pending_->pinned_retried = true;
        worker_.pool().shed_one();
        conn_ = worker_.pool().acquire(inst, this, true);
    }
    if (!conn_) {
        // No socket or TLS object could be made: our shortage (descriptors, memory), not the
        // worker's, so it is never charged to the instance's health.
        Metrics::get().upstream_connect_errors.Increment();
        log::warn("could not create a socket to a worker", {{"instance", inst->id}, {"backend", inst->address},
                                                             {"reason", std::strerror(errno)}});
        if (decision_ == Decision::Pinned) {
            release_instance();
            instance_.reset();  // never reached: not where the request went
            return false;
        }
        failed_before_response(Failure::SocketFailed, "could not create a socket");
        return true;  // handled: retried elsewhere, queued, or answered
    }
    conn_reused_ = conn_->connected();
    if (conn_reused_) send_request_head();  // a pooled connection: go at once
    return true;
}

// Ends this request's share of the instance's in-flight count (and its slot for new work, which
// goes to the oldest queued request). The record itself is kept: the access log and metrics
// still name it, and holding it costs a pointer, not a copy of its id.
void Exchange::release_instance() {
    if (!in_flight_counted_) return;
    instance_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    in_flight_counted_ = false;
    if (admitted_) {
        admitted_ = false;
        instance_->capacity.release();
        AdmissionQueue::get().slot_freed();
    }
}

void Exchange::upstream_connected() {
    log::Scope ids(correlation());
    send_request_head();
}

void Exchange::charge(Failure f, const char* why) {
    if (!instance_ || !judge(f, decision_).charge_instance) return;
    Instance& inst = *instance_;
    if (inst.record_failure(worker_.config().max_failures, why))
        log::warn("instance marked unhealthy", {{"instance", inst.id}, {"backend", inst.address}, {"reason", why}});
}

bool Exchange::can_replay() const {
    if (response_started_ || interim_count_ > 0) return false;  // a relayed 1xx ends retries
    if (!body_consumed_) return true;  // nothing of the body left the client yet
    return replay_ && !replay_overflow_;
}

// The one place that decides what happens after a failure before the response head: charge the
// instance, then retry new work elsewhere (or queue it) when the policy allows and the body can
// be replayed, else answer the client.
void Exchange::failed_before_response(Failure f, const char* why) {
    attempt_.end(0, &f, why, 0);
    FailureVerdict verdict = judge(f, decision_, pending_->repeatable);
    charge(f, why);
    if (f == Failure::ConnectFailed) Metrics::get().upstream_connect_errors.Increment();
    if (instance_)
        log::debug("upstream attempt failed", {{"instance", instance_->id}, {"backend", instance_->address}, {"reason", why}});
    if (conn_) {
        watch_sink(false);
        conn_->attach(nullptr);
        conn_.reset();
    }
    release_instance();
    head_sent_ = false;
    scan_from_ = 0;
    // Pinned work cannot go elsewhere; a stale pooled connection (never read) gets one fresh one.
    if (decision_ == Decision::Pinned && f == Failure::StaleConnection && !pending_->pinned_retried && can_replay()) {
        pending_->pinned_retried = true;
        Metrics::get().retries_by_reason[size_t(f)]->Increment();
        InstancePtr inst = instance_;
        if (connect_to(inst, true)) return;
        f = Failure::SocketFailed;
        why = "could not create a socket";
    }
    bool may_retry = verdict.retriable && can_replay();
    bool retries_left = retries_ < worker_.config().retries;
    if (may_retry && retries_left) {
        ++retries_;
        Metrics::get().upstream_retries.Increment();
        Metrics::get().retries_by_reason[size_t(f)]->Increment();
        instance_.reset();
        exhausted_ = false;
        dispatch(true);  // another instance, or back to the head of the queue
        if (!exhausted_) return;
    }
    if (may_retry && f == Failure::WorkerAtCapacity) {
        // Every instance is full (or its retries are spent): wait for a slot like new work,
        // within what is left of the queue deadline. A refusing instance is probed about once
        // per cool-down, by requests with retries left: one whose retries are spent waits for an
        // instance that answers again, so a worker refusing forever costs it --retries + 1 tries.
        instance_.reset();
        pending_->tried_count = 0;
        if (!retries_left) pending_->retries_spent = true;
        if (enqueue(true)) return;
    }
    if (f == Failure::MayHaveRun && decision_ != Decision::Pinned) {
        Metrics::get().may_have_run.Increment();
        log::warn("not retried: the call may have run",
                  {{"instance", instance_ ? instance_->id : std::string()},
                   {"backend", instance_ ? instance_->address : std::string()}, {"reason", why}});
    }
    // A request that reached its instance keeps it for the access log; one that never did
    // (connect failures) names none.
    if (f == Failure::ConnectFailed || f == Failure::SocketFailed) instance_.reset();
    if (decision_ == Decision::Pinned) Metrics::get().pinned_misses[size_t(stepflow::PinnedMiss::ConnectFailed)]->Increment();
    give_up(f, why);
}

void Exchange::give_up(Failure f, const char* why) {
    if (routing_) {
        refused_ = f;
        refused_set_ = true;
        return;
    }
    fail(f, why);
}

void Exchange::send_request_head() {
    head_sent_ = true;
    std::string& head = worker_.head_text();
    head.append(request_.method);
    head += ' ';
    head.append(request_.target);
    head.append(" HTTP/1.1\r\n");
    http1::HopByHop hop(request_);
    std::string_view forwarded_for;
    bool has_cl = false, has_host = false;
    for (const auto& h : request_.headers) {
        if (hop.contains(h)) continue;
        if (h.field == http1::Field::Host) has_host = true;
        if (h.field == http1::Field::ContentLength) { has_cl = true; continue; }
        if (h.field == http1::Field::XForwardedFor) { forwarded_for = h.value; continue; }
        if (h.field == http1::Field::XForwardedProto) continue;
        if (attempt_.open() && h.name.size() == 11 && http1::iequals(h.name, "traceparent")) continue;  // ours instead
        if (pending_->session_unsealed && h.value.data() == pending_->session_value.data()) {
            append_header(head, h.name, pending_->backend_session);  // the backend sees its own id
            continue;
        }
        append_header(head, h.name, h.value);
    }
    // HTTP/1.1 requires Host (RFC 9112 §3.2); an HTTP/1.0 request (or an HTTP/2 one without
    // :authority) may have none, and it goes out as HTTP/1.1: name the worker.
    if (!has_host) append_header(head, "Host", instance_->address);
    head.append("X-Forwarded-For: ");
    if (!forwarded_for.empty()) {
        head.append(forwarded_for);
        head.append(", ");
    }
    head.append(client_ip_);
    head.append(client_tls_ ? "\r\nX-Forwarded-Proto: https\r\n" : "\r\nX-Forwarded-Proto: http\r\n");
    if (attempt_.open()) attempt_.append_traceparent(head);
    if (request_.framing == http1::Framing::Length) {
        head.append("Content-Length: ");
        head.append(std::to_string(request_.content_length));
        head.append("\r\n");
    } else if (request_chunked_) {
        head.append("Transfer-Encoding: chunked\r\n");
    } else if (has_cl) {
        head.append("Content-Length: 0\r\n");
    }
    head.append("\r\n");
    Conn* bev = conn_->bev();
    evbuffer_add(bev->output(), head.data(), head.size());
    if (replay_ && evbuffer_get_length(replay_) > 0) {
        // A retry: what the client sent so far goes again (the rest follows as it arrives).
        size_t n = evbuffer_get_length(replay_);
        evbuffer* copy = evbuffer_new();
        evbuffer_add(copy, evbuffer_pullup(replay_, static_cast<ssize_t>(n)), n);
        evbuffer_add_buffer(bev->output(), copy);
        evbuffer_free(copy);
    }
    // New work keeps its body for a retry; pinned work (never retried) keeps it too, so a failure
    // after the body left can still echo the JSON-RPC id.
    watch_sink(true);
    conn_->set_read_timeout(worker_.config().upstream_header_timeout);
    // The client side refills the request body once the worker's side drains below a quarter
    // of the high-water mark (request_sink_full stops it above).
    if (!request_done_) {
        bev->set_watermark(EV_WRITE, kSinkHighWater / 4, 0);
        pending_->request_deadline.arm(worker_.timers(), worker_.config().upstream_request_timeout);
    }
    bev->enable(EV_READ | EV_WRITE);
    downstream_.request_sink_ready();
}

evbuffer* Exchange::request_sink() const {
    if (!conn_ || !head_sent_ || finished_) return nullptr;
    return conn_->bev()->output();
}

bool Exchange::request_sink_full() const {
    evbuffer* sink = request_sink();
    return sink && evbuffer_get_length(sink) > kSinkHighWater;
}

void Exchange::request_body_done() {
    request_done_ = true;
    // The write callback now comes only once the worker's socket took every byte.
    if (conn_ && !finished_) conn_->bev()->set_watermark(EV_WRITE, 0, 0);
    request_sent_check();
}

void Exchange::request_sent_check() {
    if (pending_ && request_done_ && pending_->request_deadline.armed() && conn_ &&
        evbuffer_get_length(conn_->bev()->output()) == 0)
        pending_->request_deadline.cancel();
}

// The worker has not taken the whole request body in --upstream-request-timeout. It may be
// taking a byte at a time, so no idle timeout catches it. Like other timeouts, not a health
// failure: the worker is slow, not broken.
void Exchange::on_request_deadline(void* arg) {
    auto* self = static_cast<Exchange*>(arg);
    if (self->finished_) return;
    log::Scope ids(self->correlation());
    self->fail(Failure::UpstreamRequestTimeout, "request body not taken by the worker in time");
}

void Exchange::upstream_writable() {
    if (finished_) return;
    request_sent_check();
    downstream_.request_sink_ready();
}

void Exchange::upstream_readable() {
    if (finished_) return;
    log::Scope ids(correlation());
    if (!response_started_ && !parse_response_head()) return;
    pump_response();
}

// The parsed head is the thread's scratch head: once passed on, only its framing is needed
// (kept by the pump), and an SSE stream may stay open for minutes.
bool Exchange::parse_response_head() {
    evbuffer* in = conn_->bev()->input();
    http1::Head& response = worker_.response_head();
    while (true) {
        size_t n = http1::find_head_end(in, kMaxResponseHead, scan_from_);
        if (n == 0) return false;
        if (n == SIZE_MAX) {
            bad_response("upstream response head too large");
            return false;
        }
        response.clear();
        response.raw.resize(n);
        evbuffer_remove(in, response.raw.data(), n);
        scan_from_ = 0;
        if (auto err = http1::parse_response(response, request_.is_head_method)) {
            bad_response(err.reason);
            return false;
        }
        if (response.status >= 200) {
            if (hold_for_capacity_check(response, in)) return false;
            break;
        }
        if (response.status == 101) {
            bad_response("upstream switched protocols");
            return false;
        }
        if (++interim_count_ > kMaxInterimResponses) {
            bad_response("too many interim responses from upstream");
            return false;
        }
        downstream_.interim_response(response.status, response.reason);
    }

    response_started_ = true;
    pending_->request_deadline.cancel();  // the worker answered: what it still reads is up to it
    release_replay();            // no retry after the head: a stream must not hold the body
    status_ = response.status;
    response_keep_alive_ = response.keep_alive;
    Instance& inst = conn_->instance();
    inst.record_success();
    inst.capacity.answered();
    auto& metrics = Metrics::get();
    metrics.upstream_responses[size_t(status_ / 100 <= 5 ? status_ / 100 : 0)]->Increment();

    const std::string& header_name = worker_.config().instance_header;
    std::vector<http1::Header>& headers = worker_.header_list();
    http1::HopByHop hop(response);
    bool has_instance_header = false;
    const Sessions* sessions = worker_.sessions();
    if (sessions && pending_->session_header && status_ / 100 == 2 && request_.method == "DELETE") {
        if (sessions->table) sessions->table->forget(pending_->session_value);
        SessionMetrics::get().ended->Increment();
    }
    for (const auto& h : response.headers) {
        if (hop.contains(h)) continue;
        if (h.name.size() == 21 && http1::iequals(h.name, "endpoint-load-metrics")) {
            int capacity = load_report_capacity(h.value);
            if (capacity > 0) inst.capacity.report(capacity, LimitSource::Header, steady_ms());
            continue;
        }
        if (sessions && sessions->match(h.name) && !h.value.empty()) {
            take_response_session(h, inst, headers);
            continue;
        }
        if (h.field == http1::Field::ContentLength && response.framing != http1::Framing::None) continue;
        if (http1::iequals(h.name, header_name)) {
            if (sessions && sessions->hide_instance_header) continue;
            has_instance_header = true;
        }
        if (h.field == http1::Field::ContentType && h.value.substr(0, 17) == "text/event-stream") sse_ = true;
        headers.push_back(h);
    }
    if (pending_->session_stale && pending_->sealed_session.empty() && status_ / 100 == 2 && request_.method != "DELETE") {
        // The worker did not repeat the session header: the balancer adds it to re-seal the id.
        reseal_session(inst);
        if (!pending_->sealed_session.empty()) headers.push_back({*pending_->session_header, pending_->sealed_session});
    }
    if (!has_instance_header && !(sessions && sessions->hide_instance_header)) headers.push_back({header_name, inst.id});
    if (!(sessions && sessions->hide_routed_instance)) headers.push_back({"X-Stepflow-Routed-Instance", inst.id});
    headers.push_back({"X-Stepflow-Routing-Decision", to_string(decision_)});
    if (sse_) {
        metrics.sse_streams_open.Increment();
        metrics.sse_streams_total.Increment();
    }

    bool chunked_out = false;
    sink_ = downstream_.start_response(status_, response.reason, headers, response.framing, response.content_length,
                                       chunked_out);
    response_pump_.start(response.framing, response.content_length, chunked_out);
    conn_->set_read_timeout(worker_.config().stream_idle_timeout);
    release_pending();  // last: the header list passed on above viewed the sealed session id
    return true;
}

// The response head arrived: the request is not dispatched again.
void Exchange::release_pending() {
    leave_queue();
    pending_.reset();
}

// A response head that breaks HTTP/1.1 is never relayed, even in part: 502, counted, and charged
// to the instance as a protocol failure.
void Exchange::bad_response(const char* why) {
    Metrics::get().upstream_bad_responses.Increment();
    charge(Failure::BadResponse, why);
    fail(Failure::BadResponse, why);
}

// A 503 to new work may be a worker at capacity (-32300), which is retried elsewhere instead of
// reaching the client. Its small body is waited for before anything is passed on. True while
// the exchange holds the response (or has moved on to another instance).
bool Exchange::hold_for_capacity_check(http1::Head& response, evbuffer* in) {
    constexpr uint64_t kMaxCheckedBody = 4096;
    if (response.status != 503 || decision_ != Decision::LeastLoad) return false;
    if (response.framing != http1::Framing::Length || response.content_length > kMaxCheckedBody) return false;
    size_t need = size_t(response.content_length);
    if (evbuffer_get_length(in) < need) {
        evbuffer_prepend(in, response.raw.data(), response.raw.size());  // parsed again when the body is in
        return true;
    }
    std::string_view body(reinterpret_cast<const char*>(evbuffer_pullup(in, static_cast<ssize_t>(need))), need);
    if (jsonrpc_error_code_of(body) != -32300) return false;
    evbuffer_drain(in, need);
    Instance& inst = conn_->instance();
    inst.capacity.refused(steady_ms(), worker_.config().capacity_recovery_interval.count());
    Metrics::get().worker_at_capacity.Increment();
    log::debug("worker at capacity", {{"instance", inst.id}, {"limit", inst.capacity.limit()}});
    if (request_done_ && response.keep_alive && evbuffer_get_length(in) == 0 &&
        evbuffer_get_length(conn_->bev()->output()) == 0) {
        // The connection is clean (no extra bytes either way): give it back rather than close it.
        watch_sink(false);
        conn_->attach(nullptr);
        worker_.pool().release(std::move(conn_));
    }
    failed_before_response(Failure::WorkerAtCapacity, "worker at capacity (-32300)");
    return true;
}

void Exchange::pump_response() {
    evbuffer* in = conn_->bev()->input();
    auto status = response_pump_.pump(in, sink_);
    if (status == http1::BodyPump::Status::Error) {
        downstream_.response_data();
        fail(Failure::CutShort, response_pump_.error());
        return;
    }
    downstream_.response_data();
    if (status == http1::BodyPump::Status::Done) {
        complete_response();
        return;
    }
    if (downstream_.response_sink_full()) conn_->bev()->disable(EV_READ);
}

void Exchange::resume_response() {
    if (finished_ || !conn_ || !response_started_) return;
    conn_->bev()->enable(EV_READ);
    pump_response();
}

void Exchange::complete_response() {
    response_done_ = true;
    bool reuse = request_done_ && response_keep_alive_ && !response_pump_.until_close() &&
                 evbuffer_get_length(conn_->bev()->input()) == 0;
    finish(reuse);
    downstream_.response_done();  // last: the downstream may let go of this exchange
}

void Exchange::upstream_closed(UpstreamClose how) {
    if (finished_) return;
    log::Scope ids(correlation());
    const char* why = describe(how);
    if (!head_sent_) {
        failed_before_response(Failure::ConnectFailed, why);
        return;
    }
    if (response_started_ && how == UpstreamClose::Eof && response_pump_.until_close()) {
        pump_response();
        if (finished_) return;
        response_pump_.finish_on_close(sink_);
        downstream_.response_data();
        complete_response();
        return;
    }
    if (how == UpstreamClose::Timeout) {
        fail(Failure::HeadTimeout, why);  // a slow worker is not a broken one: not charged
        return;
    }
    if (response_started_) {
        charge(Failure::CutShort, why);
        fail(Failure::CutShort, why);
        return;
    }
    // Closed before the response head: what the socket showed decides whether the worker may
    // have read the request (proxy/delivery.h), never whether the connection was pooled.
    bool response_seen = interim_count_ > 0 || scan_from_ != 0 || evbuffer_get_length(conn_->bev()->input()) != 0;
    bool all_sent = request_done_ && evbuffer_get_length(conn_->bev()->output()) == 0;
    bool reset = how == UpstreamClose::Reset || (how == UpstreamClose::Eof && reset_followed_close(conn_->bev()->fd()));
    Delivery d = observe_delivery(reset, all_sent, response_seen);
    failed_before_response(close_failure(d, conn_reused_), why);
}

void Exchange::fail(Failure f, const char* why) {
    if (finished_) return;
    attempt_.end(response_started_ ? status_ : 0, &f, why, response_bytes());
    int status = judge(f, decision_).status;
    if (!response_started_) status_ = status;
    bool started = response_started_;
    if (instance_)
        log::debug("exchange failed", {{"instance", instance_->id}, {"reason", why}, {"status", status}});
    finish(false);
    downstream_.exchange_failed(f, why, started);  // last, as above
}

void Exchange::finish(bool reuse_connection) {
    if (finished_) return;
    finished_ = true;
    attempt_.end(status_, nullptr, {}, response_bytes());
    note_jsonrpc_body();
    leave_queue();
    if (pending_) {
        pending_->queue_deadline.cancel();
        pending_->request_deadline.cancel();
    }
    if (sse_) Metrics::get().sse_streams_open.Decrement();
    if (conn_) {
        watch_sink(false);
        conn_->attach(nullptr);
        if (reuse_connection) worker_.pool().release(std::move(conn_));
        else conn_.reset();
    }
    release_instance();
}

// Body bytes written to the worker connection are also kept (up to --retry-buffer-size) so a
// retry can send them again. An evbuffer callback sees every addition, whichever client
// protocol wrote it.
void Exchange::watch_sink(bool on) {
    if (!conn_) return;
    evbuffer* out = conn_->bev()->output();
    if (on && !sink_cb_) {
        sink_cb_ = evbuffer_add_cb(out, on_sink_changed, this);
    } else if (!on && sink_cb_) {
        evbuffer_remove_cb_entry(out, sink_cb_);
        sink_cb_ = nullptr;
    }
}

void Exchange::on_sink_changed(evbuffer* buf, const evbuffer_cb_info* info, void* arg) {
    auto* self = static_cast<Exchange*>(arg);
    if (info->n_added == 0) return;
    self->body_consumed_ = true;
    if (self->replay_overflow_) return;
    size_t limit = self->worker_.config().retry_buffer_size;
    if (!self->replay_) self->replay_ = evbuffer_new();
    size_t have = evbuffer_get_length(self->replay_);
    size_t len = evbuffer_get_length(buf);
    if (have + info->n_added > limit || info->n_added > len) {
        self->replay_overflow_ = true;  // too large to keep: streamed, not retried
        evbuffer_free(self->replay_);
        self->replay_ = nullptr;
        return;
    }
    // Copied once, straight into the replay buffer's own space (no temporary per chunk).
    evbuffer_ptr pos;
    evbuffer_ptr_set(buf, &pos, len - info->n_added, EVBUFFER_PTR_SET);
    evbuffer_iovec space;
    if (evbuffer_reserve_space(self->replay_, static_cast<ev_ssize_t>(info->n_added), &space, 1) != 1) return;
    space.iov_len = info->n_added;
    evbuffer_copyout_from(buf, &pos, space.iov_base, info->n_added);
    evbuffer_commit_space(self->replay_, &space, 1);
}

// The response head arrived: the request can no longer go to another instance, and nothing
// after it needs the body's id (a failure now cuts the response short). An SSE stream may stay
// open for minutes, so the copy (at least a 1 KiB buffer chain) goes now, not at the end.
void Exchange::release_replay() {
    note_jsonrpc_body();  // the span's rpc.* attributes come from the copy, read before it goes
    watch_sink(false);
    if (replay_) evbuffer_free(replay_);
    replay_ = nullptr;
    replay_overflow_ = true;  // whatever the client still sends is streamed, not kept
}

void Exchange::note_jsonrpc_body() {
    if (!trace_ || !trace_->recording || !replay_ || request_chunked_) return;
    size_t n = evbuffer_get_length(replay_);
    trace_->note_jsonrpc({reinterpret_cast<const char*>(evbuffer_pullup(replay_, -1)), n});
}

std::string Exchange::replay_id_json() const {
    if (!replay_ || replay_overflow_) return "";
    if (!request_chunked_) return jsonrpc_id_of(replay_);
    // The copy is what went on the wire, chunk-framed: decode a copy of it to find the id. A body
    // still incomplete yields its leading bytes, which is where the id usually is.
    const size_t n = evbuffer_get_length(replay_);
    std::string wire(n, '\0');
    evbuffer_copyout(replay_, wire.data(), n);
    evbuffer* framed = evbuffer_new();
    evbuffer* body = evbuffer_new();
    evbuffer_add(framed, wire.data(), n);
    http1::BodyPump decoder;
    decoder.start(http1::Framing::Chunked, 0, false);
    decoder.pump(framed, body);
    std::string id = jsonrpc_id_of(body);
    evbuffer_free(framed);
    evbuffer_free(body);
    return id;
}

void Exchange::abort() {
    if (finished_) return;
    attempt_.cancel(status_, response_bytes());
    finish(false);
}

}  // namespace stepflow
