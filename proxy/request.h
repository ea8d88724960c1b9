// One request from its parsed head to its access-log line, whichever protocol carried it: it
// begins the trace, routes and admits through an Exchange, answers itself when routing refuses
// or the exchange fails (proxy/failure_policy.h decides what), keeps the request-body deadline
// and writes the record. The client connection (ClientH1, or a ClientH2 stream) keeps only its
// protocol's framing and says how to frame what the request answers (RequestFraming).
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "core/http1.h"
#include "core/timers.h"
#include "proxy/exchange.h"
#include "proxy/failure_policy.h"
#include "proxy/request_record.h"

namespace stepflow {

class LoopThread;

// Body read to echo a JSON-RPC id in a local answer; a longer body is answered without the id
// (a JSON-RPC message whose id is past 64 KiB is not worth holding more for).
constexpr size_t kLocalBodyLimit = 64 * 1024;

// What a request needs of its client protocol besides relaying the worker's response
// (Downstream). Called only on the rare paths: local answers, failures, timeouts.
class RequestFraming : public Downstream {
public:
    // The balancer's own answer is the whole response; the request is over once it is queued.
    virtual void send_answer(const LocalAnswer& answer) = 0;
    // The response has started and cannot be completed: end it so that the client sees it
    // break. `cancelled`: we gave up on the client's body (not a failure of the worker).
    virtual void break_response(bool cancelled) = 0;
    // A failed exchange is answered locally: read the body still with the client for its
    // JSON-RPC id, then call Request::answer_locally. False when the body is gone already.
    virtual bool read_body_for_id() = 0;
    // The request-body deadline passed (Request::await_body*).
    virtual void body_timed_out() = 0;
};

class Request {
public:
    // `framing` and `client_ip` belong to the client connection and outlive the request.
    Request(RequestFraming& framing, LoopThread& thread, const std::string& client_ip, bool client_tls)
        : framing_(framing), thread_(thread), client_ip_(client_ip), client_tls_(client_tls) {}
    ~Request() { drop_exchange(); }
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;

    http1::Head head;
    RequestRecord record;

    // A new request on the connection (HTTP/1.1 reuses the object): the record restarts and the
    // previous exchange, kept until now because its callbacks may have been on the stack, goes.
    void begin();
    // The head is parsed: the trace begins (continued or started). Returns the log ids the
    // caller scopes the request's lines with.
    const log::Correlation* start_trace();
    // Routes and admits: true while the request goes to a worker or waits in the admission
    // queue; false when refused, then the caller reads the body for its id and calls
    // answer_locally (or calls it at once).
    bool route();
    // The running exchange; null before routing and once it ended.
    Exchange* exchange() const { return exchange_; }
    // Frees the exchange now (no callback of it may be on the stack).
    void drop_exchange();

    // The local answer waiting for the body's JSON-RPC id: "null" when not known.
    void answer_locally(const std::string& id_json);
    // Malformed input, answered without a worker: `{"error":..,"reason":..}`.
    void reject(int status, const char* why);
    // Counts and logs a rejected request (the answer, if any, is the caller's).
    void note_rejected(int status, const char* why);

    // --- from the exchange (the client's Downstream calls these) ---
    void response_started(int status);
    void response_done();
    void exchange_failed(Failure failure, const char* why, bool response_started);

    // The client stopped sending its body in time: the worker's request is cancelled and the
    // client answered per the failure policy (or its response broken if it had started).
    void give_up_on_body();
    // The client is gone or the stream was reset: cancel the worker's request; `status` is
    // recorded when nothing was answered.
    void cancel(int status);
    // The request went wrong in its own framing: cancel the worker's request, keep where it went.
    void abandon();

    // --- the request-body deadline ---
    void await_body();           // --request-body-timeout from now: between client bytes
    void await_body_for_id();    // --local-body-timeout from now: in all, for a local answer
    void stop_awaiting_body() { body_deadline_.cancel(); }
    bool awaiting_body() const { return body_deadline_.armed(); }

    // Once a streamed response is under way only the request line is still needed (for the
    // access log). An SSE stream may stay open for minutes, so the rest of the head should not.
    void release_head();
    // The access-log line, request metrics and server span.
    void log_access();
    // ... once: later calls (and those after skip_log) do nothing.
    void log_access_once();
    void skip_log() { logged_ = true; }

    const std::string& client_ip() const { return client_ip_; }

private:
    static void on_body_timeout(void* arg);
    Exchange* retire();
    std::string pinned_id() const;

    RequestFraming& framing_;
    LoopThread& thread_;
    const std::string& client_ip_;
    // The exchange lives in the request (no allocation of its own) until the next request on
    // the connection or the request's end; exchange_ points to it while it runs.
    std::optional<Exchange> exchange_storage_;
    Exchange* exchange_ = nullptr;
    std::unique_ptr<RouteOutcome> local_;  // only while a local answer waits for the body
    // While a request body is read: --request-body-timeout between client bytes when proxying,
    // --local-body-timeout in all when reading one for a local answer.
    Deadline body_deadline_{on_body_timeout, this};
    bool client_tls_;
    bool logged_ = false;
};

}  // namespace stepflow
