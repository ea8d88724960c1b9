// One attempt towards one worker, after Envoy's UpstreamRequest: the connection (pooled or new),
// the attempt's CLIENT span, the request head written on it, the response head read from it, the
// response body relayed, and what a close before the response shows about whether the worker may
// have read the request (at most once: proxy/delivery.h). A retry, a re-queue or a fresh pinned
// connection is a new attempt on the same object. The Exchange receives the connection's events
// and decides what they mean for the request.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "core/http1.h"
#include "proxy/failure_policy.h"
#include "proxy/request_trace.h"
#include "proxy/upstream.h"

struct evbuffer;

namespace stepflow {

class Conn;
class SessionRoute;

class Attempt {
public:
    // The attempt's CLIENT span under the request's trace (`decision`: its routing attribute).
    void start_span(RequestTrace* trace, const Instance& inst, const char* decision) { span_.start(trace, inst, decision); }
    AttemptSpan& span() { return span_; }

    // An idle pooled connection to `inst` or a new one (always new with `fresh`); its events go to
    // `handler`. False when no socket could be made (our shortage, not the worker's).
    bool connect(UpstreamPool& pool, const InstancePtr& inst, UpstreamConn::Handler* handler, bool fresh);
    bool has_conn() const { return conn_ != nullptr; }
    bool reused() const { return reused_; }  // a pooled connection: connected already
    UpstreamConn& conn() const { return *conn_; }
    Conn* transport() const { return conn_->transport(); }
    evbuffer* output() const;
    evbuffer* input() const;
    // Ends the attempt's hold on the connection: back to `pool` for reuse, or closed (null).
    void let_go(UpstreamPool* pool);

    // What the request head carries besides the request's own fields.
    struct HeadContext {
        const SessionRoute* session;  // its backend id replaces the client's sealed one
        std::string_view client_ip;
        bool client_tls;
        bool chunked;  // the body goes chunk-framed
    };
    // Writes the request head (into the thread's `scratch`, then the connection).
    void send_head(std::string& scratch, const http1::Head& request, const HeadContext& ctx);
    bool head_sent() const { return head_sent_; }

    enum class HeadRead { More, Broken, Parsed };
    // Reads the next response head into `response` (Broken: `why` says how it breaks HTTP/1.1).
    HeadRead read_head(http1::Head& response, bool head_method, const char*& why);
    // An interim (1xx) response relayed; returns how many so far.
    int count_interim() { return ++interim_count_; }
    bool relayed_interim() const { return interim_count_ > 0; }

    // The connection closed before the response head: the failure it is, given what the socket
    // showed (never whether the connection was pooled, which only names the kind).
    Failure closed_unanswered(UpstreamClose how, bool request_done) const;
    // Forgets a failed attempt's progress before the next one.
    void reset_progress() {
        head_sent_ = false;
        scan_from_ = 0;
    }

    // Response body: from the worker's connection into `sink` (the downstream's, asked for
    // each time: writing into a connection's output is what queues it to be sent).
    void start_relay(http1::Framing framing, uint64_t content_length, bool chunked_out);
    http1::BodyPump::Status relay(evbuffer* sink);
    void finish_relay_on_close(evbuffer* sink);
    bool relay_until_close() const { return pump_.until_close(); }
    const char* relay_error() const { return pump_.error(); }
    uint64_t response_bytes() const { return pump_.payload_bytes(); }

private:
    std::unique_ptr<UpstreamConn> conn_;
    size_t scan_from_ = 0;  // where the response head's end is looked for next
    http1::BodyPump pump_;
    AttemptSpan span_;
    int interim_count_ = 0;  // 1xx responses relayed (over all attempts: one ends retries)
    bool reused_ = false;
    bool head_sent_ = false;
};

}  // namespace stepflow
