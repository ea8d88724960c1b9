#include "proxy/request_trace.h"

#include <charconv>
#include <cstring>

#include <simdjson.h>

#include "core/utf8.h"
#include "discovery/instance.h"
#include "proxy/local_response.h"

namespace stepflow {
namespace {

// Splits "host:port" (or "[v6]:port") for server.address / server.port.
void split_address(std::string_view address, std::string_view& host, int64_t& port) {
    size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) {
        host = address;
        port = 0;
        return;
    }
    std::string_view h = address.substr(0, colon);
    if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
    host = h;
    port = 0;
    for (char c : address.substr(colon + 1)) {
        if (c < '0' || c > '9') break;
        port = port * 10 + (c - '0');
    }
}

// The status message of a 5xx without a failure kind: "HTTP <status>".
void write_http_status(std::string& buf, size_t at, int status) {
    char text[16] = "HTTP ";
    auto [end, ec] = std::to_chars(text + 5, text + sizeof text, status);
    trace::record::status_message(buf, at, {text, size_t(end - text)});
}

// An attempt's record is built in a buffer of its own; buffers are kept per thread for the
// next attempts, so a request allocates none.
constexpr size_t kRecordCapacity = 512;
constexpr size_t kSpareBuffers = 64;
thread_local std::vector<std::string> t_spare;

void take_spare(std::string& buf) {
    if (t_spare.empty()) {
        buf.reserve(kRecordCapacity);
    } else {
        buf.swap(t_spare.back());
        t_spare.pop_back();
    }
}

void give_spare(std::string& buf) {
    buf.clear();
    if (t_spare.size() < kSpareBuffers && buf.capacity() <= 4 * kRecordCapacity) {
        t_spare.emplace_back();
        t_spare.back().swap(buf);
    }
}

constexpr size_t kSpareRecordings = 256;
thread_local std::vector<std::unique_ptr<RequestTrace::Recording>> t_spare_recordings;

}  // namespace

void RequestTrace::Release::operator()(Recording* r) const {
    if (t_spare_recordings.size() >= kSpareRecordings) {
        delete r;
        return;
    }
    for (std::string* s : {&r->method, &r->path, &r->user_agent, &r->mcp_method, &r->rpc_method, &r->rpc_id}) {
        if (s->capacity() > 256) std::string().swap(*s);  // an unusually long value: not kept
        else s->clear();
    }
    r->queue_waits.clear();
    t_spare_recordings.emplace_back(r);
}

void RequestTrace::begin(const http1::Head& request) {
    reset();
    const auto& settings = trace::settings();
    // More than one traceparent field is no parent at all (W3C Trace Context's test suite: a new
    // trace), not the first of them.
    std::string_view incoming;
    int traceparents = 0;
    for (const auto& h : request.headers) {
        if (h.name.size() == 11 && http1::iequals(h.name, "traceparent")) {
            incoming = h.value;
            ++traceparents;
        }
    }
    trace::Ids parent;
    has_parent = traceparents == 1 && trace::parse_traceparent(incoming, parent);
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
    if (t_spare_recordings.empty()) {
        rec.reset(new Recording);
    } else {
        rec.reset(t_spare_recordings.back().release());
        t_spare_recordings.pop_back();
    }
    rec->method.assign(request.method);  // a token: ASCII
    // A target and header values may hold any byte from 0x80 up; span strings must be UTF-8.
    std::string_view target = request.target;
    utf8::assign_well_formed(rec->path, target.substr(0, target.find('?')));
    utf8::assign_well_formed(rec->user_agent, request.get("User-Agent"));
    utf8::assign_well_formed(rec->mcp_method, request.get("Mcp-Method"));
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
    std::string& buf = trace::thread_records();
    uint64_t end_ns = trace::now_ns();
    // Each wait in the admission queue is a child span, so the wait shows as a bar in the trace.
    for (auto& [from, to] : r.queue_waits) {
        trace::SpanHead wait;
        std::memcpy(wait.trace_id, ids.trace_id, 16);
        trace::new_span_id(wait.span_id);
        std::memcpy(wait.parent_span_id, ids.span_id, 8);
        wait.has_parent = true;
        wait.flags = ids.flags;
        wait.kind = trace::Kind::Internal;
        wait.start_ns = from;
        size_t at = trace::record::begin(buf, wait, "admission queue");
        trace::record::finish(buf, at, to, false);
        trace::emitted();
    }
    trace::SpanHead head;
    std::memcpy(head.trace_id, ids.trace_id, 16);
    std::memcpy(head.span_id, ids.span_id, 8);
    head.has_parent = has_parent;
    if (has_parent) std::memcpy(head.parent_span_id, parent_span_id, 8);
    head.flags = ids.flags;
    head.kind = trace::Kind::Server;
    head.start_ns = start_ns;
    bool error = o.status >= 500;
    namespace rw = trace::record;
    size_t at = rw::begin(buf, head, r.method);
    rw::string(buf, "http.request.method", r.method);
    rw::string(buf, "url.path", r.path);
    if (o.status) rw::int64(buf, "http.response.status_code", o.status);
    rw::string(buf, "network.peer.address", o.client_ip);
    if (!r.user_agent.empty()) rw::string(buf, "user_agent.original", r.user_agent);
    rw::string(buf, "stepflow.routing.decision", o.decision);
    if (!o.instance_id.empty()) rw::string(buf, "stepflow.instance.id", o.instance_id);
    rw::int64(buf, "stepflow.attempts", attempts);
    rw::int64(buf, "stepflow.retries", o.retries);
    rw::real(buf, "stepflow.queue_wait_ms", o.queue_wait_ms);
    rw::int64(buf, "http.request.body.size", int64_t(o.bytes_in));
    rw::int64(buf, "http.response.body.size", int64_t(o.bytes_out));
    if (!r.mcp_method.empty()) rw::string(buf, "mcp.method.name", r.mcp_method);
    if (!r.rpc_method.empty()) {
        rw::string(buf, "rpc.system", "jsonrpc");
        rw::string(buf, "rpc.method", r.rpc_method);
        if (!r.rpc_id.empty()) rw::string(buf, "rpc.jsonrpc.request_id", r.rpc_id);
    }
    if (error) write_http_status(buf, at, o.status);
    rw::finish(buf, at, end_ns, error);
    trace::emitted();
}

void AttemptSpan::start(RequestTrace* trace, const Instance& inst, std::string_view decision) {
    open_ = new_trace_ = recording_ = cancelled_ = false;
    if (!trace || !trace->ours) return;
    open_ = true;
    new_trace_ = !trace->has_parent;
    int number = ++trace->attempts;
    trace::new_span_id(span_id_);
    std::memcpy(trace_id_, trace->ids.trace_id, 16);
    flags_ = trace->ids.flags;
    recording_ = trace->recording;
    if (!recording_) return;
    // The record is written as the attempt runs (it may end after the request's record is gone)
    // and handed to the exporter's buffer when it ends.
    trace::SpanHead head;
    std::memcpy(head.trace_id, trace->ids.trace_id, 16);
    std::memcpy(head.span_id, span_id_, 8);
    std::memcpy(head.parent_span_id, trace->ids.span_id, 8);
    head.has_parent = true;
    head.flags = trace->ids.flags;
    head.kind = trace::Kind::Client;
    head.start_ns = trace::now_ns();
    namespace rw = trace::record;
    std::string& buf = record_;
    if (buf.capacity() < kRecordCapacity) take_spare(buf);
    buf.clear();
    rw::begin(buf, head, trace->rec->method);
    std::string_view host;
    int64_t port = 0;
    split_address(inst.address, host, port);
    rw::string(buf, "http.request.method", trace->rec->method);
    rw::string(buf, "url.path", trace->rec->path);
    rw::string(buf, "server.address", host);
    if (port) rw::int64(buf, "server.port", port);
    rw::string(buf, "stepflow.instance.id", inst.id);
    rw::string(buf, "stepflow.routing.decision", decision);
    rw::int64(buf, "stepflow.attempt", number);
    if (number > 1) rw::int64(buf, "http.request.resend_count", number - 1);
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
        trace::record::string(record_, "error.type", "cancelled");
        cancelled_ = true;
    }
    end(status, nullptr, {}, bytes_out);
}

void AttemptSpan::end(int status, const Failure* failure, std::string_view why, uint64_t bytes_out) {
    if (!open_) return;
    open_ = false;
    if (!recording_) return;
    namespace rw = trace::record;
    std::string& buf = record_;
    uint64_t end_ns = trace::now_ns();
    if (status) rw::int64(buf, "http.response.status_code", status);
    if (bytes_out) rw::int64(buf, "http.response.body.size", int64_t(bytes_out));
    bool error = cancelled_;
    if (failure) {
        rw::string(buf, "stepflow.failure", to_string(*failure));
        rw::string(buf, "error.type", to_string(*failure));
        error = true;
        if (!why.empty()) rw::status_message(buf, 0, why);
    } else if (status >= 500) {
        error = true;
        write_http_status(buf, 0, status);
    } else if (cancelled_) {
        rw::status_message(buf, 0, "the client went away");
    }
    rw::finish(buf, 0, end_ns, error);
    trace::emit(buf);
    give_spare(buf);
}

}  // namespace stepflow
