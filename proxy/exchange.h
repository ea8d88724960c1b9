// One request's trip to a worker and back: route it, connect (retrying new work elsewhere when
// a connection cannot be opened), send the head and body, stream the response back. The client
// side is behind the Downstream interface so HTTP/1.1 and HTTP/2 connections share this code.
// The exchange coordinates; the jobs live beside it: session routing (session_route.h), the
// place in the admission queue (queue_ticket.h), the body kept for a retry (replay_buffer.h),
// and what a failure means (failure_policy.h).
#pragma once

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/http1.h"
#include "core/timers.h"
#include "discovery/instance.h"
#include "proxy/attempt.h"
#include "proxy/delivery.h"
#include "proxy/failure_policy.h"
#include "proxy/metrics.h"
#include "proxy/queue_ticket.h"
#include "proxy/replay_buffer.h"
#include "proxy/request_trace.h"
#include "proxy/session_route.h"
#include "proxy/upstream.h"

struct evbuffer;

namespace stepflow {

class LoopThread;

// Everything the exchange needs to tell the client side. Calls come from the event loop.
class Downstream {
public:
    virtual ~Downstream() = default;
    // The worker's response head, filtered of hop-by-hop fields, plus the routing headers.
    // Sets whether the pump must chunk-encode the body.
    virtual void start_response(int status, std::string_view reason, const std::vector<http1::Header>& headers,
                                http1::Framing upstream_framing, uint64_t content_length, bool& chunked_out) = 0;
    virtual void interim_response(int status, std::string_view reason) = 0;  // 100 Continue, 103
    // Where body payload goes, asked for each write: on HTTP/1.1 the client connection's output,
    // which is sent once the current callbacks return.
    virtual evbuffer* response_sink() = 0;
    virtual void response_data() = 0;                                         // more bytes in the sink
    virtual bool response_sink_full() = 0;                                    // stop reading the worker
    virtual void response_done() = 0;
    // The exchange failed. Before the response head: answer per the failure policy
    // (answer_failure). After it: the response is cut short and the client must see an error.
    virtual void exchange_failed(Failure failure, const char* why, bool response_started) = 0;
    // The upstream request head went out; body bytes may be written to `request_sink` now.
    virtual void request_sink_ready() = 0;
};

// Connecting: on its way to an instance (or sent already, on a pooled connection). Queued:
// waiting in the admission queue for a free slot. Refused: answer `failure` locally.
struct RouteOutcome {
    enum Kind { Connecting, Queued, Refused } kind = Connecting;
    Failure failure = Failure::NoInstance;
    std::string pinned_id;
    std::string detail;  // for data.detail, when the failure came from an exchange
};

class Exchange final : public UpstreamConn::Handler {
public:
    // `request` and `client_ip` belong to the client connection and outlive the exchange. The
    // request's fields are read only until the response starts: the client may then cut the
    // head down to its request line (ClientH1::release_request_head).
    Exchange(LoopThread& thread, Downstream& downstream, const http1::Head& request, const std::string& client_ip,
             bool client_tls);
    ~Exchange() override;

    // The request's trace (owned by the client side's record): attempts become its CLIENT spans.
    void set_trace(RequestTrace* trace) { trace_ = trace; }

    // Chooses an instance and starts connecting, or queues new work while no instance has a
    // free slot. When refused nothing is started.
    RouteOutcome route();
    // The admission queue offers a free slot (LoopThread::run_admitted).
    void slot_offered();
    // Answers a request still waiting in the queue 503 now (draining: before the drain timeout).
    void queue_timed_out(const char* why);
    // True once request body bytes went to a worker (the client no longer holds them all).
    bool body_consumed() const { return pending_ ? pending_->replay.consumed() : body_consumed_; }
    // The request's JSON-RPC id from the body kept for replay, "" when not known.
    std::string replay_id_json() const { return pending_ ? pending_->replay.id_json() : std::string(); }
    double queue_wait_ms() const { return queue_wait_ms_; }
    int retries() const { return retries_; }

    // Where request body bytes go (the upstream connection's output, queued to send: ask only to
    // write), nullptr until connected.
    evbuffer* request_sink() const;
    // Where the client side copies the body payload it writes to request_sink (before its chunk
    // framing), for a retry; null once the response started (no retry then).
    ReplayBuffer* replay_copy() { return pending_ ? &pending_->replay : nullptr; }
    bool request_sink_full() const;
    // The client finished sending the request body.
    void request_body_done();
    // The client can take more response bytes again.
    void resume_response();
    // The client went away or the exchange must stop: close the upstream connection, which is the
    // worker's signal that the request was cancelled.
    void abort();

    Decision decision() const { return decision_; }
    // The instance the request went to (or last tried); null before routing. Kept after the
    // exchange ends, for the access log and metrics.
    const InstancePtr& routed_instance() const { return instance_; }
    uint64_t response_bytes() const { return attempt_.response_bytes(); }

    // UpstreamConn::Handler
    void upstream_connected() override;
    void upstream_readable() override;
    void upstream_writable() override;
    void upstream_closed(UpstreamClose how) override;

private:
    bool request_sink_open() const;
    bool connect_to(const InstancePtr& inst, bool fresh = false);
    bool dispatch(bool from_queue);
    bool enqueue(bool at_front);
    void leave_queue(uint64_t until_unix_ns = 0);
    static void on_queue_timeout(void* arg);
    void failed_before_response(Failure f, const char* why);
    void give_up(Failure f, const char* why);
    void charge(Failure f, const char* why);
    bool can_replay() const;
    bool hold_for_capacity_check(http1::Head& response, evbuffer* in);
    void count_mcp_method();
    RouteOutcome pin_to(const Fleet& fleet, Decision how, std::string_view instance_id, std::string_view named);
    void send_request_head();
    bool parse_response_head();
    void bad_response(const char* why);
    void pump_response();
    void complete_response();
    void finish(bool reuse_connection);
    void fail(Failure f, const char* why);
    void release_instance();
    static void on_request_deadline(void* arg);
    void request_sent_check();
    const log::Correlation* correlation() const { return trace_ ? trace_->correlation() : nullptr; }
    void note_jsonrpc_body();

    static constexpr size_t kMaxAttempts = 12;  // instances tried for one unpinned request

    LoopThread& thread_;
    Downstream& downstream_;
    const http1::Head& request_;
    const std::string& client_ip_;

    // What only routing, queueing and retrying need: freed once the response head arrived (the
    // request is then dispatched for the last time), so an open stream does not hold it.
    struct Pending {
        Pending(Exchange* self, size_t replay_limit)
            : queue(on_queue_timeout, self), request_deadline(on_request_deadline, self), replay(replay_limit) {}
        SessionRoute session;
        QueueTicket queue;
        uint8_t tried_count = 0;
        std::array<Instance*, kMaxAttempts> tried{};  // instances tried for new work
        bool cold_start = false;  // arrived while no instance took new work: waits --cold-start-timeout
        bool retries_spent = false;   // refused with no retry left: only instances answering again take it
        bool repeatable = false;      // may run twice without harm (proxy/delivery.h may_repeat)
        bool pinned_retried = false;  // pinned work gets one fresh connection after our own failure
        uint64_t queued_unix_ns = 0;  // traced only: when the current wait in the queue began
        // --upstream-request-timeout: from the head's send until the worker took the whole body.
        Deadline request_deadline;
        ReplayBuffer replay;
        // One per request, freed when the response head arrives: from the per-thread block cache.
        static void* operator new(size_t size);
        static void operator delete(void* p);
    };
    void release_pending();

    // Ordered largest first, so that the object a stream holds carries no padding.
    std::unique_ptr<Pending> pending_;  // null once the response head arrived
    InstancePtr instance_;
    Attempt attempt_;  // the current attempt towards a worker
    double queue_wait_ms_ = 0;
    int retries_ = 0;
    int status_ = 0;
    Decision decision_ = Decision::None;
    Failure refused_ = Failure::NoInstance;
    bool client_tls_;
    bool in_flight_counted_ = false;  // this request is counted in instance_->in_flight
    bool holds_new_work_slot_ = false;  // ... and holds a slot of instance_->new_work
    bool routing_ = false;  // inside route(): a refusal is returned, not sent
    bool refused_set_ = false;
    bool exhausted_ = false;  // dispatch found no untried instance taking new work
    bool body_consumed_ = false;  // pending_->replay's, kept when pending_ goes
    bool request_chunked_ = false;
    bool request_done_ = false;
    bool response_started_ = false;
    bool response_done_ = false;
    bool finished_ = false;
    bool sse_ = false;
    bool response_keep_alive_ = false;
    RequestTrace* trace_ = nullptr;
};

}  // namespace stepflow
