#include "proxy/exchange.h"

#include <cerrno>
#include <cstring>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include "proxy/conn.h"
#include <event2/event.h>

#include "proxy/log.h"
#include "proxy/router.h"
#include "proxy/worker.h"

namespace stepflow {
namespace {

constexpr size_t kMaxResponseHead = 256 * 1024;
constexpr size_t kSinkHighWater = 256 * 1024;

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
      client_tls_(client_tls) {
    request_chunked_ = request_.framing == http1::Framing::Chunked;
    request_done_ = request_.framing == http1::Framing::None;
}

Exchange::~Exchange() { abort(); }

RouteOutcome Exchange::route() {
    const Fleet& fleet = worker_.fleet().get();
    auto& metrics = Metrics::get();
    std::string_view pin = request_.get(worker_.config().instance_header);
    if (!pin.empty()) {
        decision_ = Decision::Pinned;
        stepflow::PinnedMiss why{};
        Instance* inst = route_pinned(fleet, pin, why);
        if (!inst) {
            metrics.pinned_misses[size_t(why)]->Increment();
            return {RouteOutcome::PinnedMiss, why, std::string(pin)};
        }
        metrics.routing_decisions[size_t(Decision::Pinned)]->Increment();
        if (!connect_to(inst->shared_from_this())) {
            metrics.pinned_misses[size_t(stepflow::PinnedMiss::ConnectFailed)]->Increment();
            return {RouteOutcome::PinnedMiss, stepflow::PinnedMiss::ConnectFailed, std::string(pin)};
        }
        return {};
    }
    decision_ = Decision::LeastLoad;
    if (connect_next_candidate()) {
        metrics.routing_decisions[size_t(Decision::LeastLoad)]->Increment();
        return {};
    }
    decision_ = Decision::None;
    metrics.no_healthy_instance.Increment();
    return {RouteOutcome::NoInstance, {}, {}};
}

bool Exchange::connect_to(const InstancePtr& inst) {
    instance_ = inst;
    inst->in_flight.fetch_add(1, std::memory_order_relaxed);
    in_flight_counted_ = true;
    conn_ = worker_.pool().acquire(inst, this);
    if (!conn_) {
        // No socket or TLS object could be made: our shortage (descriptors, memory), not the
        // worker's, so it is never charged to the instance's health.
        Metrics::get().upstream_connect_errors.Increment();
        log::warn("could not create a socket to a worker", {{"instance", inst->id}, {"backend", inst->address},
                                                             {"reason", std::strerror(errno)}});
        release_instance();
        instance_.reset();  // never reached: not where the request went
        return false;
    }
    if (conn_->connected()) send_request_head();  // a pooled connection: go at once
    return true;
}

// Ends this request's share of the instance's in-flight count. The record itself is kept: the
// access log and metrics still name it, and holding it costs a pointer, not a copy of its id.
void Exchange::release_instance() {
    if (!in_flight_counted_) return;
    instance_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    in_flight_counted_ = false;
}

// Connects to the least-loaded instance not tried yet, trying the next one when a socket cannot
// even be created; false once none is left or kMaxAttempts were used. Every candidate after the
// first is a retry.
bool Exchange::connect_next_candidate() {
    const Fleet& fleet = worker_.fleet().get();
    while (tried_count_ < kMaxAttempts) {
        Instance* inst = route_least_load(fleet, worker_.rng(), {tried_.data(), tried_count_});
        if (!inst) return false;
        if (tried_count_ > 0) Metrics::get().upstream_retries.Increment();
        tried_[tried_count_++] = inst;
        if (connect_to(inst->shared_from_this())) return true;
    }
    return false;
}

void Exchange::upstream_connected() { send_request_head(); }

void Exchange::connect_failed(const char* why) {
    Instance& inst = conn_->instance();
    Metrics::get().upstream_connect_errors.Increment();
    if (inst.record_failure(worker_.config().max_failures, why))
        log::warn("instance marked unhealthy", {{"instance", inst.id}, {"backend", inst.address}, {"reason", why}});
    log::debug("upstream connect failed", {{"instance", inst.id}, {"backend", inst.address}, {"reason", why}});
    conn_.reset();
    release_instance();
    instance_.reset();  // never reached: not where the request went
    if (decision_ == Decision::LeastLoad) {
        // Nothing was sent: new work may go to the next candidate.
        if (!connect_next_candidate()) fail(503, "no instance could be reached");
        return;
    }
    Metrics::get().pinned_misses[size_t(stepflow::PinnedMiss::ConnectFailed)]->Increment();
    fail(503, why);
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
    bool has_cl = false;
    for (const auto& h : request_.headers) {
        if (hop.contains(h)) continue;
        if (h.field == http1::Field::ContentLength) { has_cl = true; continue; }
        if (h.field == http1::Field::XForwardedFor) { forwarded_for = h.value; continue; }
        if (h.field == http1::Field::XForwardedProto) continue;
        append_header(head, h.name, h.value);
    }
    head.append("X-Forwarded-For: ");
    if (!forwarded_for.empty()) {
        head.append(forwarded_for);
        head.append(", ");
    }
    head.append(client_ip_);
    head.append(client_tls_ ? "\r\nX-Forwarded-Proto: https\r\n" : "\r\nX-Forwarded-Proto: http\r\n");
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
    conn_->set_read_timeout(worker_.config().upstream_header_timeout);
    // The client side refills the request body once the worker's side drains below a quarter
    // of the high-water mark (request_sink_full stops it above).
    if (!request_done_) bev->set_watermark(EV_WRITE, kSinkHighWater / 4, 0);
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

void Exchange::request_body_done() { request_done_ = true; }

void Exchange::upstream_writable() {
    if (!finished_) downstream_.request_sink_ready();
}

void Exchange::upstream_readable() {
    if (finished_) return;
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
            fail(502, "upstream response head too large");
            return false;
        }
        response.clear();
        response.raw.resize(n);
        evbuffer_remove(in, response.raw.data(), n);
        scan_from_ = 0;
        if (auto err = http1::parse_response(response, request_.is_head_method)) {
            fail(502, err.reason);
            return false;
        }
        if (response.status >= 200) break;
        if (response.status == 101) {
            fail(502, "upstream switched protocols");
            return false;
        }
        downstream_.interim_response(response.status, response.reason);
    }

    response_started_ = true;
    status_ = response.status;
    response_keep_alive_ = response.keep_alive;
    Instance& inst = conn_->instance();
    inst.record_success();
    auto& metrics = Metrics::get();
    metrics.upstream_responses[size_t(status_ / 100 <= 5 ? status_ / 100 : 0)]->Increment();

    const std::string& header_name = worker_.config().instance_header;
    std::vector<http1::Header>& headers = worker_.header_list();
    http1::HopByHop hop(response);
    bool has_instance_header = false;
    for (const auto& h : response.headers) {
        if (hop.contains(h)) continue;
        if (h.field == http1::Field::ContentLength && response.framing != http1::Framing::None) continue;
        if (http1::iequals(h.name, header_name)) has_instance_header = true;
        if (h.field == http1::Field::ContentType && h.value.substr(0, 17) == "text/event-stream") sse_ = true;
        headers.push_back(h);
    }
    if (!has_instance_header) headers.push_back({header_name, inst.id});
    headers.push_back({"X-Stepflow-Routed-Instance", inst.id});
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
    return true;
}

void Exchange::pump_response() {
    evbuffer* in = conn_->bev()->input();
    auto status = response_pump_.pump(in, sink_);
    if (status == http1::BodyPump::Status::Error) {
        downstream_.response_data();
        fail(502, response_pump_.error());
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
    const char* why = describe(how);
    if (!head_sent_) {
        connect_failed(why);
        return;
    }
    Instance& inst = conn_->instance();
    if (response_started_ && how == UpstreamClose::Eof && response_pump_.until_close()) {
        pump_response();
        if (finished_) return;
        response_pump_.finish_on_close(sink_);
        downstream_.response_data();
        complete_response();
        return;
    }
    // A slow worker is not a broken one: timeouts do not count against its health.
    bool timed_out = how == UpstreamClose::Timeout;
    if (!timed_out && inst.record_failure(worker_.config().max_failures, why))
        log::warn("instance marked unhealthy", {{"instance", inst.id}, {"backend", inst.address}, {"reason", why}});
    int status = 502;
    if (!response_started_ && timed_out) {
        status = 504;
    } else if (!response_started_ && decision_ == Decision::Pinned) {
        // The instance holding the session is gone or broken: the orchestrator must hear
        // "Instance not available", not a generic gateway error.
        Metrics::get().pinned_misses[size_t(stepflow::PinnedMiss::ConnectFailed)]->Increment();
        status = 503;
    }
    fail(status, why);
}

void Exchange::fail(int status, const char* why) {
    if (finished_) return;
    if (!response_started_) status_ = status;
    bool started = response_started_;
    if (instance_)
        log::debug("exchange failed", {{"instance", instance_->id}, {"reason", why}, {"status", status}});
    finish(false);
    downstream_.exchange_failed(status, why, started);  // last, as above
}

void Exchange::finish(bool reuse_connection) {
    if (finished_) return;
    finished_ = true;
    if (sse_) Metrics::get().sse_streams_open.Decrement();
    if (conn_) {
        conn_->attach(nullptr);
        if (reuse_connection) worker_.pool().release(std::move(conn_));
        else conn_.reset();
    }
    release_instance();
}

void Exchange::abort() {
    if (finished_) return;
    finish(false);
}

}  // namespace stepflow
