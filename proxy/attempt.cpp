#include "proxy/attempt.h"

#include <event2/buffer.h>

#include "proxy/conn.h"
#include "proxy/delivery.h"
#include "proxy/session_route.h"

namespace stepflow {
namespace {

constexpr size_t kMaxResponseHead = 256 * 1024;

}  // namespace

bool Attempt::connect(UpstreamPool& pool, const InstancePtr& inst, UpstreamConn::Handler* handler, bool fresh) {
    conn_ = pool.acquire(inst, handler, fresh);
    if (!conn_) return false;
    reused_ = conn_->connected();
    return true;
}

evbuffer* Attempt::output() const { return conn_->transport()->output(); }
evbuffer* Attempt::input() const { return conn_->transport()->input(); }

void Attempt::let_go(UpstreamPool* pool) {
    if (!conn_) return;
    conn_->attach(nullptr);
    if (pool) pool->release(std::move(conn_));
    else conn_.reset();
}

void Attempt::send_head(std::string& head, const http1::Head& request, const HeadContext& ctx) {
    head_sent_ = true;
    const std::string& worker = conn_->instance().address;
    // At most: every field as it came (or the backend's own session id in its place), Host,
    // X-Forwarded-For (the client's value is one of the fields) and X-Forwarded-Proto.
    constexpr std::string_view kVersion = " HTTP/1.1\r\n", kForwardedFor = "X-Forwarded-For: ", kComma = ", ";
    std::string_view proto = ctx.client_tls ? "\r\nX-Forwarded-Proto: https\r\n" : "\r\nX-Forwarded-Proto: http\r\n";
    size_t bound = request.method.size() + 1 + request.target.size() + kVersion.size();
    for (const auto& h : request.headers) {
        const std::string* own = ctx.session ? ctx.session->backend_value_for(h) : nullptr;
        bound += http1::HeadWriter::field_size(h.name, own ? std::max(own->size(), h.value.size()) : h.value.size());
    }
    bound += http1::HeadWriter::field_size("Host", worker.size()) + kForwardedFor.size() + kComma.size() +
             ctx.client_ip.size() + proto.size();
    bool has_cl = false;
    {
        http1::HeadWriter w(head, bound);
        w.put(request.method);
        w.put(" ");
        w.put(request.target);
        w.put(kVersion);
        http1::HopByHop hop(request);
        std::string_view forwarded_for;
        bool has_host = false;
        for (const auto& h : request.headers) {
            if (hop.contains(h)) continue;
            if (h.field == http1::Field::Host) has_host = true;
            if (h.field == http1::Field::ContentLength) { has_cl = true; continue; }
            if (h.field == http1::Field::XForwardedFor) { forwarded_for = h.value; continue; }
            if (h.field == http1::Field::XForwardedProto) continue;
            if (span_.open() && h.name.size() == 11 && http1::iequals(h.name, "traceparent")) continue;  // ours instead
            if (span_.new_trace() && h.name.size() == 10 && http1::iequals(h.name, "tracestate")) continue;
            const std::string* own = ctx.session ? ctx.session->backend_value_for(h) : nullptr;
            w.field(h.name, own ? std::string_view(*own) : h.value);  // the backend sees its own session id
        }
        // HTTP/1.1 requires Host (RFC 9112 §3.2); an HTTP/1.0 request (or an HTTP/2 one without
        // :authority) may have none, and it goes out as HTTP/1.1: name the worker.
        if (!has_host) w.field("Host", worker);
        w.put(kForwardedFor);
        if (!forwarded_for.empty()) {
            w.put(forwarded_for);
            w.put(kComma);
        }
        w.put(ctx.client_ip);
        w.put(proto);
    }
    if (span_.open()) span_.append_traceparent(head);
    if (request.framing == http1::Framing::Length) {
        head.append("Content-Length: ");
        head.append(std::to_string(request.content_length));
        head.append("\r\n");
    } else if (ctx.chunked) {
        head.append("Transfer-Encoding: chunked\r\n");
    } else if (has_cl) {
        head.append("Content-Length: 0\r\n");
    }
    head.append("\r\n");
    evbuffer_add(output(), head.data(), head.size());
}

Attempt::HeadRead Attempt::read_head(http1::Head& response, bool head_method, const char*& why) {
    evbuffer* in = input();
    size_t n = http1::find_head_end(in, kMaxResponseHead, scan_from_);
    if (n == 0) return HeadRead::More;
    if (n == SIZE_MAX) {
        why = "upstream response head too large";
        return HeadRead::Broken;
    }
    response.clear();
    response.raw.resize(n);
    evbuffer_remove(in, response.raw.data(), n);
    scan_from_ = 0;
    if (auto err = http1::parse_response(response, head_method)) {
        why = err.reason;
        return HeadRead::Broken;
    }
    return HeadRead::Parsed;
}

Failure Attempt::closed_unanswered(UpstreamClose how, bool request_done) const {
    Conn* transport = conn_->transport();
    bool response_seen = interim_count_ > 0 || scan_from_ != 0 || evbuffer_get_length(transport->input()) != 0;
    bool all_sent = request_done && transport->output_length() == 0;
    bool reset = how == UpstreamClose::Reset || (how == UpstreamClose::Eof && reset_followed_close(transport->fd()));
    return close_failure(observe_delivery(reset, all_sent, response_seen), reused_);
}

void Attempt::start_relay(http1::Framing framing, uint64_t content_length, bool chunked_out) {
    pump_.start(framing, content_length, chunked_out);
}

http1::BodyPump::Status Attempt::relay(evbuffer* sink) { return pump_.pump(input(), sink); }

void Attempt::finish_relay_on_close(evbuffer* sink) { pump_.finish_on_close(sink); }

}  // namespace stepflow
