#include "proxy/request_trace.h"

#include <cstring>

#include <simdjson.h>

#include "discovery/instance.h"
#include "proxy/local_response.h"

namespace stepflow {
namespace {

// Splits "host:port" (or "[v6]:port") for server.address / server.port.
void split_address(std::string_view address, std::string& host, int64_t& port) {
    size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) {
        host.assign(address);
        port = 0;
        return;
    }
    std::string_view h = address.substr(0, colon);
    if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
    host.assign(h);
    port = 0;
    for (char c : address.substr(colon + 1)) {
        if (c < '0' || c > '9') break;
        port = port * 10 + (c - '0');
    }
}

}  // namespace

void RequestTrace::begin(const http1::Head& request) {
    reset();
    const auto& settings = trace::settings();
    std::string_view incoming = request.get("traceparent");
    trace::Ids parent;
    has_parent = !incoming.empty() && trace::parse_traceparent(incoming, parent);
    if (!settings.enabled) {
        // Not a hop of the trace: the traceparent goes to the worker untouched, yet log lines
        // still name the trace and the caller's span.
        if (!has_parent) return;
        active = true;
        ids = parent;
    } else {
        active = ours = true;
        if (has_parent) {
            std::memcpy(ids.trace_id, parent.trace_id, 16);
            std::memcpy(parent_span_id, parent.span_id, 8);
        } else {
            trace::new_trace_id(ids.trace_id);
        }
        trace::new_span_id(ids.span_id);
        recording = trace::sample(ids.trace_id, has_parent ? &parent : nullptr);
        // Flags other than "sampled" pass on as they came (W3C Trace Context §3.2.2.5).
        ids.flags = static_cast<uint8_t>(((has_parent ? parent.flags : 0) & ~1u) | (recording ? 1 : 0));
    }
    trace::to_hex(ids.trace_id, 16, log_ids.trace_id);
    log_ids.trace_id[32] = 0;
    trace::to_hex(ids.span_id, 8, log_ids.span_id);
    log_ids.span_id[16] = 0;
    if (!recording) return;
    start_ns = trace::now_ns();
    rec = std::make_unique<Recording>();
    rec->method.assign(request.method);
    std::string_view target = request.target;
    rec->path.assign(target.substr(0, target.find('?')));
    rec->user_agent.assign(request.get("User-Agent"));
    rec->mcp_method.assign(request.get("Mcp-Method"));
}

void RequestTrace::note_jsonrpc(std::string_view body) {
    if (!recording || body.empty() || !rec->rpc_method.empty()) return;
    // One parser per thread for the usual small bodies (a new parser allocates its buffers for
    // every request); a large body gets its own, so no thread keeps a large parser's memory.
    thread_local simdjson::dom::parser shared;
    simdjson::dom::parser own;
    simdjson::dom::parser& parser = body.size() <= 16 * 1024 ? shared : own;
    simdjson::dom::object obj;
    if (parser.parse(body.data(), body.size()).get(obj) != simdjson::SUCCESS) return;
    std::string_view m;
    if (obj["method"].get(m) != simdjson::SUCCESS) return;
    rec->rpc_method.assign(m);
    simdjson::dom::element id;
    if (obj["id"].get(id) == simdjson::SUCCESS) {
        if (id.is_string()) rec->rpc_id.assign(std::string_view(id));
        else if (id.is_int64()) rec->rpc_id = std::to_string(int64_t(id));
        else if (id.is_uint64()) rec->rpc_id = std::to_string(uint64_t(id));
    }
}

void RequestTrace::end(const Outcome& o) {
    if (!recording || ended) return;
    ended = true;
    Recording& r = *rec;
    trace::SpanData span;
    std::memcpy(span.trace_id, ids.trace_id, 16);
    std::memcpy(span.span_id, ids.span_id, 8);
    span.has_parent = has_parent;
    if (has_parent) std::memcpy(span.parent_span_id, parent_span_id, 8);
    span.flags = ids.flags;
    span.kind = trace::Kind::Server;
    span.name = r.method;
    span.start_ns = start_ns;
    span.end_ns = trace::now_ns();
    span.error = o.status >= 500;
    auto& a = span.attributes;
    a.reserve(20);
    a.push_back({"http.request.method", r.method});
    a.push_back({"url.path", r.path});
    if (o.status) a.push_back({"http.response.status_code", int64_t(o.status)});
    a.push_back({"network.peer.address", std::string(o.client_ip)});
    if (!r.user_agent.empty()) a.push_back({"user_agent.original", r.user_agent});
    a.push_back({"stepflow.routing.decision", std::string(o.decision)});
    if (!o.instance_id.empty()) a.push_back({"stepflow.instance.id", std::string(o.instance_id)});
    a.push_back({"stepflow.attempts", int64_t(attempts)});
    a.push_back({"stepflow.retries", int64_t(o.retries)});
    a.push_back({"stepflow.queue_wait_ms", o.queue_wait_ms});
    a.push_back({"http.request.body.size", int64_t(o.bytes_in)});
    a.push_back({"http.response.body.size", int64_t(o.bytes_out)});
    if (!r.mcp_method.empty()) a.push_back({"mcp.method.name", r.mcp_method});
    if (!r.rpc_method.empty()) {
        a.push_back({"rpc.system", std::string("jsonrpc")});
        a.push_back({"rpc.method", r.rpc_method});
        if (!r.rpc_id.empty()) a.push_back({"rpc.jsonrpc.request_id", r.rpc_id});
    }
    if (span.error) span.status_message = "HTTP " + std::to_string(o.status);
    // Each wait in the admission queue is a child span, so the wait shows as a bar in the trace.
    for (auto& [from, to] : r.queue_waits) {
        trace::SpanData wait;
        std::memcpy(wait.trace_id, ids.trace_id, 16);
        trace::new_span_id(wait.span_id);
        std::memcpy(wait.parent_span_id, ids.span_id, 8);
        wait.has_parent = true;
        wait.flags = ids.flags;
        wait.kind = trace::Kind::Internal;
        wait.name = "admission queue";
        wait.start_ns = from;
        wait.end_ns = to;
        trace::emit(std::move(wait));
    }
    trace::emit(std::move(span));
}

void AttemptSpan::start(RequestTrace* trace, const Instance& inst, std::string_view decision) {
    open_ = recording_ = false;
    if (!trace || !trace->ours) return;
    open_ = true;
    int number = ++trace->attempts;
    trace::new_span_id(span_id_);
    std::memcpy(trace_id_, trace->ids.trace_id, 16);
    flags_ = trace->ids.flags;
    recording_ = trace->recording;
    if (!recording_) return;
    data_ = std::make_unique<trace::SpanData>();
    trace::SpanData& d = *data_;
    std::memcpy(d.trace_id, trace->ids.trace_id, 16);
    std::memcpy(d.span_id, span_id_, 8);
    std::memcpy(d.parent_span_id, trace->ids.span_id, 8);
    d.has_parent = true;
    d.flags = trace->ids.flags;
    d.kind = trace::Kind::Client;
    d.name = trace->rec->method;
    d.start_ns = trace::now_ns();
    std::string host;
    int64_t port = 0;
    split_address(inst.address, host, port);
    auto& a = d.attributes;
    a.reserve(12);
    a.push_back({"http.request.method", trace->rec->method});
    a.push_back({"url.path", trace->rec->path});
    a.push_back({"server.address", std::move(host)});
    if (port) a.push_back({"server.port", port});
    a.push_back({"stepflow.instance.id", inst.id});
    a.push_back({"stepflow.routing.decision", std::string(decision)});
    a.push_back({"stepflow.attempt", int64_t(number)});
    if (number > 1) a.push_back({"http.request.resend_count", int64_t(number - 1)});
}

void AttemptSpan::append_traceparent(std::string& head) const {
    char value[55];
    trace::format_traceparent(trace_id_, span_id_, flags_, value);
    head.append("traceparent: ");
    head.append(value, sizeof value);
    head.append("\r\n");
}

void AttemptSpan::cancel(int status, uint64_t bytes_out) {
    if (open_ && recording_) {
        data_->attributes.push_back({"error.type", std::string("cancelled")});
        data_->error = true;
        data_->status_message = "the client went away";
    }
    end(status, nullptr, {}, bytes_out);
}

void AttemptSpan::end(int status, const Failure* failure, std::string_view why, uint64_t bytes_out) {
    if (!open_) return;
    open_ = false;
    if (!recording_) return;
    trace::SpanData& d = *data_;
    d.end_ns = trace::now_ns();
    auto& a = d.attributes;
    if (status) a.push_back({"http.response.status_code", int64_t(status)});
    if (bytes_out) a.push_back({"http.response.body.size", int64_t(bytes_out)});
    if (failure) {
        a.push_back({"stepflow.failure", std::string(to_string(*failure))});
        a.push_back({"error.type", std::string(to_string(*failure))});
        d.error = true;
        d.status_message.assign(why);
    } else if (status >= 500) {
        d.error = true;
        d.status_message = "HTTP " + std::to_string(status);
    }
    trace::emit(std::move(d));
    data_.reset();
}

}  // namespace stepflow
