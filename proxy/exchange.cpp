#include "proxy/exchange.h"

#include <cerrno>
#include <cstring>
#include <new>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include "proxy/conn.h"
#include <event2/event.h>

#include "core/log.h"
#include "proxy/admission.h"
#include "proxy/block_cache.h"
#include "proxy/demand.h"
#include "proxy/local_response.h"
#include "proxy/router.h"
#include "proxy/sessions.h"
#include "proxy/loop_thread.h"

namespace stepflow {

void* Exchange::Pending::operator new(size_t size) {
    if (void* p = block_alloc(size)) return p;
    throw std::bad_alloc();
}
void Exchange::Pending::operator delete(void* p) { block_free(p); }

namespace {

constexpr size_t kSinkHighWater = 256 * 1024;
// Interim (1xx) responses relayed for one request: a worker sends one or two (100 Continue, 103
// Early Hints); an endless stream of them would hold the exchange open without a response.
constexpr int kMaxInterimResponses = 16;

// The attempt span's stepflow.routing.decision (docs/tracing.md): says which pin.
const char* span_decision(Decision d) {
    switch (d) {
    case Decision::PinnedByHeader: return "pinned-header";
    case Decision::PinnedBySession: return "pinned-session";
    default: return "least-load";
    }
}

}  // namespace

Exchange::Exchange(LoopThread& thread, Downstream& downstream, const http1::Head& request, const std::string& client_ip,
                   bool client_tls)
    : thread_(thread), downstream_(downstream), request_(request), client_ip_(client_ip),
      pending_(std::make_unique<Pending>(this, thread.config().retry_buffer_size)), client_tls_(client_tls) {
    request_chunked_ = request_.framing == http1::Framing::Chunked;
    request_done_ = request_.framing == http1::Framing::None;
    pending_->repeatable = may_repeat(request_, thread_.config().trust_idempotency_key);
}

Exchange::~Exchange() {
    abort();
}

RouteOutcome Exchange::route() {
    const Fleet& fleet = thread_.fleet().get();
    count_mcp_method();
    if (const Sessions* sessions = thread_.sessions()) {
        // A request naming a session goes to the instance holding it.
        thread_local std::string instance_id;  // scratch: no allocation per request once warm
        Failure refused = Failure::NoInstance;
        switch (pending_->session.find(*sessions, request_, instance_id, refused)) {
        case SessionRoute::Lookup::Refused: return {RouteOutcome::Refused, refused, {}, {}};
        case SessionRoute::Lookup::Found:
            decision_ = Decision::PinnedBySession;
            if (pending_->session.instance_gone(*sessions, fleet.find(instance_id), instance_id))
                return {RouteOutcome::Refused, Failure::SessionNotFound, {}, {}};
            // The answers never name the instance: with sealed ids the client is not told it.
            return pin_to(fleet, Decision::PinnedBySession, instance_id, {});
        case SessionRoute::Lookup::None: break;
        }
    }
    std::string_view pin = request_.get(thread_.config().instance_header);
    if (!pin.empty()) return pin_to(fleet, Decision::PinnedByHeader, pin, pin);
    decision_ = Decision::LeastLoad;
    if (!route_least_load(fleet, thread_.rng())) {
        // No instance takes new work: a fleet at zero waking up, or a bad rollout. The request
        // waits in the queue for the first instance to become routable (docs/autoscaling.md).
        if (thread_.config().cold_start_timeout.count() == 0) {
            decision_ = Decision::None;
            count_refused(Failure::NoInstance, decision_);
            return {RouteOutcome::Refused, Failure::NoInstance, {}, {}};
        }
        pending_->cold_start = true;
    }
    thread_.series().routed(Decision::LeastLoad);
    routing_ = true;
    bool going = dispatch(false);
    routing_ = false;
    bool queued = pending_ && pending_->queue.queued();
    if (pending_ && pending_->cold_start && going && queued) DemandSignal::get().held_on_empty_fleet();
    if (!going && !refused_set_) {
        refused_ = Failure::QueueFull;
        refused_set_ = true;
        count_refused(Failure::QueueFull, decision_);
    }
    if (refused_set_) return {RouteOutcome::Refused, refused_, {}, {}};
    return {queued ? RouteOutcome::Queued : RouteOutcome::Connecting, {}, {}, {}};
}

// The one route of pinned work, by header or by session. It bypasses capacity and the queue: an
// execution waiting on its callback answer must never wait behind new work queued for its own
// slot. `named` is the instance id the answer may name (none for sessions).
RouteOutcome Exchange::pin_to(const Fleet& fleet, Decision how, std::string_view instance_id, std::string_view named) {
    decision_ = how;
    PinnedMiss why{};
    Instance* inst = route_pinned(fleet, instance_id, why);
    if (!inst) {
        Failure f = why == PinnedMiss::UnknownInstance ? Failure::PinnedUnknown : Failure::PinnedNotServing;
        count_refused(f, how);
        return {RouteOutcome::Refused, f, std::string(named), {}};
    }
    thread_.series().routed(how);
    if (!connect_to(inst->shared_from_this())) {
        count_refused(Failure::SocketFailed, how);
        return {RouteOutcome::Refused, Failure::SocketFailed, std::string(named), {}};
    }
    return {RouteOutcome::Connecting, {}, {}, {}};
}

// Sends new work to the least-loaded instance with a free slot (never one tried already), or
// queues it. False only when the queue is full. Work arriving while others wait joins the queue
// behind them (first come, first served), unless the queue itself offers the slot.
bool Exchange::dispatch(bool from_queue) {
    const Fleet& fleet = thread_.fleet().get();
    if (!from_queue && AdmissionQueue::get().depth() > 0) return enqueue(false);
    while (pending_->tried_count < kMaxAttempts) {
        Instance* inst = route_least_load(fleet, thread_.rng(), {pending_->tried.data(), pending_->tried_count}, true);
        if (!inst) break;
        if (pending_->retries_spent && inst->capacity.refusals() > 0) {
            pending_->tried[pending_->tried_count++] = inst;  // no more refusals for it: never a probe
            continue;
        }
        if (!inst->capacity.try_take()) continue;  // another thread took the last slot: look again
        holds_new_work_slot_ = true;
        pending_->tried[pending_->tried_count++] = inst;
        connect_to(inst->shared_from_this());
        return true;
    }
    if (finished_) return true;
    if (pending_->tried_count > 0 && !pending_->retries_spent &&
        !route_least_load(fleet, thread_.rng(), {pending_->tried.data(), pending_->tried_count}, false)) {
        exhausted_ = true;  // every instance taking new work was tried: waiting would not help
        return true;
    }
    return enqueue(from_queue);
}

bool Exchange::enqueue(bool at_front) {
    switch (pending_->queue.join(thread_, this, at_front, pending_->cold_start, pending_->retries_spent)) {
    case QueueTicket::Join::Waiting:
        if (trace_ && trace_->recording) pending_->queued_unix_ns = trace::now_ns();
        return true;
    case QueueTicket::Join::Full: return false;
    case QueueTicket::Join::DeadlinePassed:
        count_refused(Failure::QueueTimeout, decision_);
        give_up(Failure::QueueTimeout, "queue deadline passed");
        return true;
    }
    return true;
}

// Ends this request's place in the queue (dispatched, timed out, or cancelled). A traced wait
// ends at `until_unix_ns` when given: the moment the slot was offered, before the attempt began.
void Exchange::leave_queue(uint64_t until_unix_ns) {
    if (!pending_) return;
    double ms = pending_->queue.leave(thread_);
    if (ms < 0) return;
    queue_wait_ms_ += ms;
    if (trace_ && trace_->recording && pending_->queued_unix_ns)
        trace_->note_queue_wait(pending_->queued_unix_ns, until_unix_ns ? until_unix_ns : trace::now_ns());
}

void Exchange::slot_offered() {
    log::Scope ids(correlation());
    if (!pending_) return;
    pending_->queue.handed_over();
    if (finished_) return;
    pending_->tried_count = 0;  // a slot freed since: every instance may be tried again
    uint64_t offered_ns = trace_ && trace_->recording ? trace::now_ns() : 0;  // the wait ends before the attempt
    if (dispatch(true) && pending_ && !pending_->queue.queued() && !finished_) {
        leave_queue(offered_ns);
        // Room left where this one went (an unlimited instance, or a fleet just woken up): the
        // next in line goes too, without waiting for a request to end or the admission tick.
        if (holds_new_work_slot_ && instance_ && instance_->capacity.has_room()) offer_queued_work();
    }
}

void Exchange::on_queue_timeout(void* arg) {
    auto* self = static_cast<Exchange*>(arg);
    log::Scope ids(self->correlation());
    if (!self->pending_->queue.waiting()) {
        self->pending_->queue.expire();  // at a worker now: only a later re-queue is refused
        return;
    }
    if (self->pending_->cold_start && !route_least_load(self->thread_.fleet().get(), self->thread_.rng())) {
        self->leave_queue();
        DemandSignal::get().cold_start_timeouts.Increment();
        count_refused(Failure::NoInstance, self->decision_);
        self->fail(Failure::NoInstance, "no instance became routable within --cold-start-timeout");
        return;
    }
    self->queue_timed_out("no slot freed within --queue-timeout");
}

void Exchange::queue_timed_out(const char* why) {
    leave_queue();
    count_refused(Failure::QueueTimeout, decision_);
    fail(Failure::QueueTimeout, why);
}

void Exchange::count_mcp_method() {
    std::string_view method = request_.get("Mcp-Method");
    if (!method.empty()) SessionMetrics::get().mcp_requests[mcp_method_index(method)]->Increment();
}

bool Exchange::connect_to(const InstancePtr& inst, bool fresh) {
    instance_ = inst;
    attempt_.start_span(trace_, *inst, span_decision(decision_));
    inst->in_flight.fetch_add(1, std::memory_order_relaxed);
    in_flight_counted_ = true;
    if (!attempt_.connect(thread_.pool(), inst, this, fresh) && is_pinned(decision_) && !pending_->pinned_retried) {
        // Our shortage must not end a pinned step: free an idle pooled connection (a descriptor)
        // and try once more.
        pending_->pinned_retried = true;
        thread_.pool().shed_one();
        attempt_.connect(thread_.pool(), inst, this, true);
    }
    if (!attempt_.has_conn()) {
        // No socket or TLS object could be made: our shortage (descriptors, memory), not the
        // worker's, so it is never charged to the instance's health.
        Metrics::get().upstream_connect_errors.Increment();
        log::warn("could not create a socket to a worker", {{"instance", inst->id}, {"backend", inst->address},
                                                             {"reason", std::strerror(errno)}});
        if (is_pinned(decision_)) {
            release_instance();
            instance_.reset();  // never reached: not where the request went
            return false;
        }
        failed_before_response(Failure::SocketFailed, "could not create a socket");
        return true;  // handled: retried elsewhere, queued, or answered
    }
    if (attempt_.reused()) send_request_head();  // a pooled connection: go at once
    return true;
}

// Ends this request's share of the instance's in-flight count (and its slot for new work, which
// goes to the oldest queued request). The record itself is kept: the access log and metrics
// still name it, and holding it costs a pointer, not a copy of its id.
void Exchange::release_instance() {
    if (!in_flight_counted_) return;
    instance_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    in_flight_counted_ = false;
    if (holds_new_work_slot_) {
        holds_new_work_slot_ = false;
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
    if (inst.record_failure(thread_.config().max_failures, why))
        log::warn("instance marked unhealthy", {{"instance", inst.id}, {"backend", inst.address}, {"reason", why}});
}

bool Exchange::can_replay() const {
    if (response_started_ || attempt_.relayed_interim()) return false;  // a relayed 1xx ends retries
    const ReplayBuffer& replay = pending_->replay;
    if (!replay.consumed()) return true;  // nothing of the body left the client yet
    return replay.complete();
}

// A failure before the response head: reports what was observed to the failure policy and
// carries out its verdict (a fresh connection, another instance, the queue again, or the answer).
void Exchange::failed_before_response(Failure f, const char* why) {
    attempt_.span().end(0, &f, why, 0);
    AttemptFailure what{f, decision_, pending_->repeatable, can_replay(), pending_->pinned_retried,
                        retries_ < thread_.config().retries};
    AttemptVerdict verdict = judge_attempt(what);
    count_failed_attempt(what);
    if (verdict.charge_instance) charge(f, why);
    if (instance_)
        log::debug("upstream attempt failed", {{"instance", instance_->id}, {"backend", instance_->address}, {"reason", why}});
    attempt_.let_go(nullptr);
    attempt_.reset_progress();
    release_instance();
    if (verdict.fresh_connection) {
        pending_->pinned_retried = true;
        count_retry(what, false);
        InstancePtr inst = instance_;
        if (connect_to(inst, true)) return;
        failed_before_response(Failure::SocketFailed, "could not create a socket");
        return;
    }
    if (verdict.other_instance) {
        ++retries_;
        count_retry(what, true);
        instance_.reset();
        exhausted_ = false;
        dispatch(true);  // another instance, or back to the head of the queue
        if (!exhausted_) return;
    }
    if (verdict.requeue) {
        instance_.reset();
        pending_->tried_count = 0;
        if (!what.retries_left) pending_->retries_spent = true;
        if (enqueue(true)) return;
    }
    count_answered(what, instance_.get(), why);
    if (!verdict.name_instance) instance_.reset();
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
    attempt_.send_head(thread_.head_text(), request_,
                       {pending_ ? &pending_->session : nullptr, client_ip_, client_tls_, request_chunked_});
    Conn* transport = attempt_.transport();
    // A retry: what the client sent so far goes again (the rest follows as it arrives). New work
    // keeps its body for a retry; pinned work keeps it too, so a failure after the body left can
    // still echo the JSON-RPC id.
    pending_->replay.resend(transport->output(), request_chunked_, request_done_);
    attempt_.conn().set_read_timeout(thread_.config().upstream_header_timeout);
    // The client side refills the request body once the worker's side drains below a quarter
    // of the high-water mark (request_sink_full stops it above).
    if (!request_done_) {
        transport->set_watermark(EV_WRITE, kSinkHighWater / 4, 0);
        pending_->request_deadline.arm(thread_.timers(), thread_.config().upstream_request_timeout);
    }
    transport->enable(EV_READ | EV_WRITE);
    downstream_.request_sink_ready();
}

bool Exchange::request_sink_open() const { return attempt_.has_conn() && attempt_.head_sent() && !finished_; }

evbuffer* Exchange::request_sink() const { return request_sink_open() ? attempt_.output() : nullptr; }

// Read without asking for the output, which would queue the connection to send.
bool Exchange::request_sink_full() const {
    return request_sink_open() && attempt_.transport()->output_length() > kSinkHighWater;
}

void Exchange::request_body_done() {
    request_done_ = true;
    // A chunked body's last chunk went out: the body left the client even without payload.
    if (request_chunked_ && pending_) pending_->replay.end_sent();
    // The write callback now comes only once the worker's socket took every byte.
    if (attempt_.has_conn() && !finished_) attempt_.transport()->set_watermark(EV_WRITE, 0, 0);
    request_sent_check();
}

void Exchange::request_sent_check() {
    if (pending_ && request_done_ && pending_->request_deadline.armed() && attempt_.has_conn() &&
        attempt_.transport()->output_length() == 0)
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
    http1::Head& response = thread_.response_head();
    while (true) {
        const char* why = nullptr;
        Attempt::HeadRead read = attempt_.read_head(response, request_.is_head_method, why);
        if (read == Attempt::HeadRead::More) return false;
        if (read == Attempt::HeadRead::Broken) {
            bad_response(why);
            return false;
        }
        if (response.status >= 200) {
            if (hold_for_capacity_check(response, attempt_.input())) return false;
            break;
        }
        if (response.status == 101) {
            bad_response("upstream switched protocols");
            return false;
        }
        if (attempt_.count_interim() > kMaxInterimResponses) {
            bad_response("too many interim responses from upstream");
            return false;
        }
        downstream_.interim_response(response.status, response.reason);
    }

    response_started_ = true;
    pending_->request_deadline.cancel();  // the worker answered: what it still reads is up to it
    note_jsonrpc_body();  // the span's rpc.* attributes come from the replay copy, read before it goes
    status_ = response.status;
    response_keep_alive_ = response.keep_alive;
    Instance& inst = attempt_.conn().instance();
    inst.record_success();
    inst.capacity.answered();
    auto& metrics = Metrics::get();
    thread_.series().upstream_response(status_);

    const std::string& header_name = thread_.config().instance_header;
    std::vector<http1::Header>& headers = thread_.header_list();
    http1::HopByHop hop(response);
    bool has_instance_header = false;
    const Sessions* sessions = thread_.sessions();
    if (sessions) pending_->session.response_status(*sessions, status_, request_.method);
    for (const auto& h : response.headers) {
        if (hop.contains(h)) continue;
        if (h.name.size() == 21 && http1::iequals(h.name, "endpoint-load-metrics")) {
            int capacity = load_report_capacity(h.value);
            if (capacity > 0) inst.capacity.report(capacity, LimitSource::Header, steady_ms());
            continue;
        }
        if (sessions && sessions->match(h.name) && !h.value.empty()) {
            pending_->session.take(*sessions, h, inst, headers);
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
    if (sessions) pending_->session.reseal_if_stale(*sessions, status_, request_.method, inst, headers);
    if (!has_instance_header && !(sessions && sessions->hide_instance_header)) headers.push_back({header_name, inst.id});
    if (!(sessions && sessions->hide_routed_instance)) headers.push_back({"X-Stepflow-Routed-Instance", inst.id});
    headers.push_back({"X-Stepflow-Routing-Decision", to_string(decision_)});
    if (sse_) {
        metrics.sse_streams_open.Increment();
        metrics.sse_streams_total.Increment();
    }

    bool chunked_out = false;
    downstream_.start_response(status_, response.reason, headers, response.framing, response.content_length,
                               chunked_out);
    attempt_.start_relay(response.framing, response.content_length, chunked_out);
    attempt_.conn().set_read_timeout(thread_.config().stream_idle_timeout);
    release_pending();  // last: the header list passed on above viewed the sealed session id
    return true;
}

// The response head arrived: the request is not dispatched again. An SSE stream may stay open
// for minutes, so what only routing and retrying need (the body copy too: at least a 1 KiB
// buffer chain) goes now, not at the end.
void Exchange::release_pending() {
    leave_queue();
    body_consumed_ = pending_->replay.consumed();
    pending_.reset();
}

// A response head that breaks HTTP/1.1 is never relayed, even in part: 502, counted, and charged
// to the instance as a protocol failure.
void Exchange::bad_response(const char* why) {
    count_worker_failure(Failure::BadResponse);
    charge(Failure::BadResponse, why);
    fail(Failure::BadResponse, why);
}

// A 503 to new work may be a worker at capacity (-32300), which is retried elsewhere instead of
// reaching the client. Its small body is waited for before anything is passed on. True while
// the exchange holds the response (or has moved on to another instance).
bool Exchange::hold_for_capacity_check(http1::Head& response, evbuffer* in) {
    constexpr uint64_t kMaxCheckedBody = 4096;
    // Only where the failure policy would send the request elsewhere.
    if (response.status != 503 || !judge(Failure::WorkerAtCapacity, decision_).retriable) return false;
    if (response.framing != http1::Framing::Length || response.content_length > kMaxCheckedBody) return false;
    size_t need = size_t(response.content_length);
    if (evbuffer_get_length(in) < need) {
        evbuffer_prepend(in, response.raw.data(), response.raw.size());  // parsed again when the body is in
        return true;
    }
    std::string_view body(reinterpret_cast<const char*>(evbuffer_pullup(in, static_cast<ssize_t>(need))), need);
    if (jsonrpc_error_code_of(body) != -32300) return false;
    evbuffer_drain(in, need);
    Instance& inst = attempt_.conn().instance();
    inst.capacity.refused(steady_ms(), thread_.config().capacity_recovery_interval.count());
    count_worker_failure(Failure::WorkerAtCapacity);
    log::debug("worker at capacity", {{"instance", inst.id}, {"limit", inst.capacity.limit()}});
    if (request_done_ && response.keep_alive && evbuffer_get_length(in) == 0 &&
        attempt_.transport()->output_length() == 0) {
        // The connection is clean (no extra bytes either way): give it back rather than close it.
        attempt_.let_go(&thread_.pool());
    }
    failed_before_response(Failure::WorkerAtCapacity, "worker at capacity (-32300)");
    return true;
}

void Exchange::pump_response() {
    auto status = attempt_.relay(downstream_.response_sink());
    if (status == http1::BodyPump::Status::Error) {
        downstream_.response_data();
        fail(Failure::CutShort, attempt_.relay_error());
        return;
    }
    downstream_.response_data();
    if (status == http1::BodyPump::Status::Done) {
        complete_response();
        return;
    }
    if (downstream_.response_sink_full()) attempt_.transport()->disable(EV_READ);
}

void Exchange::resume_response() {
    if (finished_ || !attempt_.has_conn() || !response_started_) return;
    attempt_.transport()->enable(EV_READ);
    pump_response();
}

void Exchange::complete_response() {
    response_done_ = true;
    bool reuse = request_done_ && response_keep_alive_ && !attempt_.relay_until_close() &&
                 evbuffer_get_length(attempt_.input()) == 0;
    finish(reuse);
    downstream_.response_done();  // last: the downstream may let go of this exchange
}

void Exchange::upstream_closed(UpstreamClose how) {
    if (finished_) return;
    log::Scope ids(correlation());
    const char* why = describe(how);
    if (!attempt_.head_sent()) {
        failed_before_response(Failure::ConnectFailed, why);
        return;
    }
    if (response_started_ && how == UpstreamClose::Eof && attempt_.relay_until_close()) {
        pump_response();
        if (finished_) return;
        attempt_.finish_relay_on_close(downstream_.response_sink());
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
    // have read the request (proxy/delivery.h).
    failed_before_response(attempt_.closed_unanswered(how, request_done_), why);
}

void Exchange::fail(Failure f, const char* why) {
    if (finished_) return;
    attempt_.span().end(response_started_ ? status_ : 0, &f, why, response_bytes());
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
    attempt_.span().end(status_, nullptr, {}, response_bytes());
    note_jsonrpc_body();
    leave_queue();
    if (pending_) {
        pending_->queue.cancel_deadline();
        pending_->request_deadline.cancel();
    }
    if (sse_) Metrics::get().sse_streams_open.Decrement();
    attempt_.let_go(reuse_connection ? &thread_.pool() : nullptr);
    release_instance();
}

void Exchange::note_jsonrpc_body() {
    // A chunked body's copy was kept framed before; its spans never carried rpc.* (kept so).
    if (!trace_ || !trace_->recording || !pending_ || request_chunked_) return;
    std::string_view body = pending_->replay.view();
    if (!body.empty()) trace_->note_jsonrpc(body);
}

void Exchange::abort() {
    if (finished_) return;
    attempt_.span().cancel(status_, response_bytes());
    finish(false);
}

}  // namespace stepflow
