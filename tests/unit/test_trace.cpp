#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include <event2/event.h>

#include "core/text.h"
#include "core/trace_context.h"
#include "otlp.pb.h"
#include "proxy/otlp_exporter.h"
#include "proxy/request_trace.h"
#include "proxy/span.h"
#include "tests/unit/instances.h"

using namespace stepflow;

namespace {
std::string hex(const uint8_t* p, size_t n) {
    std::string s(2 * n, '\0');
    trace::to_hex(p, n, s.data());
    return s;
}
}  // namespace

TEST_CASE("a valid traceparent is parsed", "[trace]") {
    trace::Ids ids;
    REQUIRE(trace::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ids));
    CHECK(hex(ids.trace_id, 16) == "4bf92f3577b34da6a3ce929d0e0e4736");
    CHECK(hex(ids.span_id, 8) == "00f067aa0ba902b7");
    CHECK(ids.flags == 1);
    // A later version may append fields; its first four are read the same way.
    CHECK(trace::parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra", ids));
    CHECK(ids.flags == 0);
}

TEST_CASE("an invalid traceparent is refused", "[trace]") {
    trace::Ids ids;
    for (const char* bad : {"", "garbage",
                            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  // zero trace id
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  // zero span id
                            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  // upper case
                            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  // version ff
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",  // 00 has no more fields
                            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g"})
        CHECK_FALSE(trace::parse_traceparent(bad, ids));
}

TEST_CASE("a traceparent is written lowercase with our span as parent", "[trace]") {
    uint8_t t[16], s[8];
    trace::new_trace_id(t);
    trace::new_span_id(s);
    char out[55];
    trace::format_traceparent(t, s, 1, out);
    std::string v(out, 55);
    trace::Ids back;
    REQUIRE(trace::parse_traceparent(v, back));
    CHECK(std::memcmp(back.trace_id, t, 16) == 0);
    CHECK(std::memcmp(back.span_id, s, 8) == 0);
    CHECK(v.substr(52) == "-01");
}

TEST_CASE("samplers decide as the OpenTelemetry specification says", "[trace]") {
    uint8_t id[16] = {};
    id[15] = 1;  // a tiny trace id value: inside any ratio above 0
    trace::Ids sampled, unsampled;
    sampled.flags = 1;
    unsampled.flags = 0;
    trace::Settings s;
    s.sampler = trace::Sampler::ParentAlwaysOn;
    trace::configure(s);
    CHECK(trace::sample(id, nullptr));
    CHECK(trace::sample(id, &sampled));
    CHECK_FALSE(trace::sample(id, &unsampled));
    s.sampler = trace::Sampler::ParentTraceIdRatio;
    s.ratio = 0;
    trace::configure(s);
    CHECK_FALSE(trace::sample(id, nullptr));
    CHECK(trace::sample(id, &sampled));
    s.ratio = 0.5;
    trace::configure(s);
    CHECK(trace::sample(id, nullptr));
    uint8_t high[16];
    std::memset(high, 0xff, sizeof high);
    CHECK_FALSE(trace::sample(high, nullptr));
    s.sampler = trace::Sampler::AlwaysOff;
    trace::configure(s);
    CHECK_FALSE(trace::sample(id, &sampled));
    trace::configure(trace::Settings{});
}

TEST_CASE("OTLP endpoints are parsed per protocol", "[trace]") {
    OtlpTarget t;
    std::string error;
    REQUIRE(parse_otlp_endpoint("http://otel-collector:4317", OtlpTarget::Protocol::Grpc, false, t, error));
    CHECK((t.host == "otel-collector" && t.port == 4317 && !t.tls));
    REQUIRE(parse_otlp_endpoint("https://collector.example", OtlpTarget::Protocol::HttpProtobuf, false, t, error));
    CHECK((t.host == "collector.example" && t.port == 4318 && t.tls && t.path == "/v1/traces"));
    REQUIRE(parse_otlp_endpoint("http://[::1]:9999/otlp/", OtlpTarget::Protocol::HttpProtobuf, false, t, error));
    CHECK((t.host == "::1" && t.port == 9999 && t.path == "/otlp/v1/traces"));
    REQUIRE(parse_otlp_endpoint("http://c:4318/custom/traces", OtlpTarget::Protocol::HttpProtobuf, true, t, error));
    CHECK(t.path == "/custom/traces");
    CHECK_FALSE(parse_otlp_endpoint("otel-collector:4317", OtlpTarget::Protocol::Grpc, false, t, error));
    CHECK_FALSE(parse_otlp_endpoint("http://c:99999", OtlpTarget::Protocol::Grpc, false, t, error));
    CHECK_FALSE(parse_otlp_endpoint("http://:4317", OtlpTarget::Protocol::Grpc, false, t, error));
}

namespace {
// The request as protobuf's generated classes build and serialize it (the exporter's encoder
// before it wrote the wire format by hand): the reference the hand encoder must match byte for byte.
void set_value(otlp::AnyValue* out, const trace::Value& v) {
    if (auto s = std::get_if<std::string>(&v)) out->set_string_value(*s);
    else if (auto i = std::get_if<int64_t>(&v)) out->set_int_value(*i);
    else if (auto d = std::get_if<double>(&v)) out->set_double_value(*d);
    else if (auto b = std::get_if<bool>(&v)) out->set_bool_value(*b);
}

std::string protobuf_encode(const std::vector<std::pair<std::string, std::string>>& resource,
                            const std::vector<trace::SpanData>& spans) {
    otlp::ExportTraceServiceRequest request;
    auto* rs = request.add_resource_spans();
    for (auto& [k, v] : resource) {
        auto* kv = rs->mutable_resource()->add_attributes();
        kv->set_key(k);
        kv->mutable_value()->set_string_value(v);
    }
    auto* ss = rs->add_scope_spans();
    ss->mutable_scope()->set_name("stepflow-lb");
    ss->mutable_scope()->set_version(STEPFLOW_LB_VERSION);
    for (auto& s : spans) {
        auto* span = ss->add_spans();
        const trace::SpanHead& h = s.head;
        span->set_trace_id(reinterpret_cast<const char*>(h.trace_id), 16);
        span->set_span_id(reinterpret_cast<const char*>(h.span_id), 8);
        if (h.has_parent) span->set_parent_span_id(reinterpret_cast<const char*>(h.parent_span_id), 8);
        span->set_name(s.name);
        span->set_kind(static_cast<otlp::Span_SpanKind>(h.kind));
        span->set_start_time_unix_nano(h.start_ns);
        span->set_end_time_unix_nano(h.end_ns);
        span->set_flags(h.flags | 0x100);
        if (h.has_parent && h.kind == trace::Kind::Server) span->set_flags(span->flags() | 0x200);
        for (auto& a : s.attributes) {
            auto* kv = span->add_attributes();
            kv->set_key(std::string(a.key));
            set_value(kv->mutable_value(), a.value);
        }
        if (h.error) {
            span->mutable_status()->set_code(otlp::Status_StatusCode_STATUS_CODE_ERROR);
            span->mutable_status()->set_message(s.status_message);
        }
    }
    return request.SerializeAsString();
}

std::string records_of(const std::vector<trace::SpanData>& spans) {
    std::string records;
    for (auto& s : spans) trace::write(records, s);
    return records;
}
}  // namespace

TEST_CASE("spans are encoded as protobuf encodes the OTLP messages", "[trace]") {
    std::vector<trace::SpanData> spans(6);
    trace::SpanData& server = spans[0];
    trace::SpanHead& h = server.head;
    for (int i = 0; i < 16; ++i) h.trace_id[i] = uint8_t(0xf0 + i);
    for (int i = 0; i < 8; ++i) h.span_id[i] = uint8_t(i + 1), h.parent_span_id[i] = uint8_t(0x80 | i);
    h.has_parent = true;
    h.kind = trace::Kind::Server;
    server.name = "POST";
    h.start_ns = 1765000000123456789u;
    h.end_ns = h.start_ns + 250000;
    h.error = true;
    server.status_message = "HTTP 502";
    server.attributes = {{"http.request.method", std::string("POST")},
                         {"url.path", std::string("/mcp/\xc3\xa9t\xc3\xa9")},
                         {"http.response.status_code", int64_t(502)},
                         {"stepflow.retries", int64_t(0)},
                         {"stepflow.instance.id", std::string()},
                         {"stepflow.queue_wait_ms", 0.0},
                         {"stepflow.queue_wait_ms", 12.625},
                         {"http.request.body.size", int64_t(-1)},
                         {"stepflow.flag", true},
                         {"stepflow.other", false},
                         {"long", std::string(300, 'x')},
                         {"b", std::string(120, 'z')},  // around the one-byte-length fast path
                         {"b", std::string(121, 'z')},
                         {"c", std::string(127, 'z')},
                         {"c", std::string(128, 'z')},
                         {"", std::string(70000, 'y')}};
    trace::SpanData& client = spans[1];  // no parent, no error, kind CLIENT
    client.head.kind = trace::Kind::Client;
    client.head.flags = 0;
    client.name = std::string(200, 'n');
    client.head.start_ns = 1;
    trace::SpanData& bare = spans[2];  // every optional field at its default
    bare.name.clear();
    trace::SpanData& failed = spans[3];  // an error without a message
    failed.head.error = true;
    failed.head.kind = trace::Kind::Internal;
    failed.name = "admission queue";
    trace::SpanData& unended = spans[4];  // a message and an error, no end time (its field is left out)
    unended.head.error = true;
    unended.status_message = "the client went away";
    unended.attributes = {{"error.type", std::string("cancelled")}};
    trace::SpanData& fine = spans[5];  // a message without an error: no status is exported
    fine.head.end_ns = 7;
    fine.status_message = "not an error";
    std::vector<std::pair<std::string, std::string>> resource = {{"service.name", "stepflow-lb"},
                                                                 {"k8s.namespace.name", ""}, {"", "v"}};
    std::string records = records_of(spans);
    std::string buffer;
    CHECK(otlp_exporter::encode(resource, records, buffer) == protobuf_encode(resource, spans));
    CHECK(otlp_exporter::encode({}, records, buffer) == protobuf_encode({}, spans));
    CHECK(otlp_exporter::encode(resource, {}, buffer) == protobuf_encode(resource, {}));
    // Decoded by protobuf, the request says what the spans said.
    otlp::ExportTraceServiceRequest decoded;
    std::string ours(otlp_exporter::encode(resource, records, buffer));
    REQUIRE(decoded.ParseFromString(ours));
    REQUIRE(decoded.resource_spans(0).scope_spans(0).spans_size() == 6);
    CHECK(decoded.resource_spans(0).scope_spans(0).spans(0).attributes(6).value().double_value() == 12.625);
    CHECK(decoded.resource_spans(0).scope_spans(0).spans(0).status().message() == "HTTP 502");
}

TEST_CASE("the span queue takes whole records, at most its capacity", "[trace]") {
    trace::Queue::configure(3, 2);
    std::string spare;
    while (trace::Queue::take(spare, 100, 0)) spare.clear();  // what earlier tests left
    uint64_t dropped = trace::Queue::dropped();
    for (int i = 0; i < 5; ++i) {
        trace::SpanData s;
        s.head.start_ns = uint64_t(i + 1);
        s.name = std::string(size_t(i) * 7, 'a');
        trace::write(trace::thread_records(), s);
        trace::emitted();  // no loop attached: handed on at once
    }
    CHECK(trace::Queue::size() == 3);
    CHECK(trace::Queue::dropped() == dropped + 2);
    std::string taken;
    REQUIRE(trace::Queue::take(taken, 2, 0) == 2);
    REQUIRE(trace::Queue::take(taken, 2, 0) == 1);
    std::vector<uint64_t> starts;
    for (const char* p = taken.data(); p < taken.data() + taken.size(); p += trace::record_size(p)) {
        otlp::Span span;  // each record is the Span's protobuf bytes after its prefix
        REQUIRE(span.ParseFromArray(trace::span_bytes(p).data(), int(trace::span_bytes(p).size())));
        starts.push_back(span.start_time_unix_nano());
    }
    CHECK(starts == std::vector<uint64_t>{1, 2, 3});
    trace::Queue::configure(2048, 512);
}

TEST_CASE("a batch is cut at hand-off boundaries, and inside a hand-off larger than the batch", "[trace]") {
    std::string spare;
    while (trace::Queue::take(spare, 100, 0)) spare.clear();  // what earlier tests left
    event_base* base = event_base_new();
    trace::attach_loop(base);  // spans now leave once per loop turn
    auto turn = [&](int first, int n) {
        for (int i = first; i < first + n; ++i) {
            trace::SpanData s;
            s.head.start_ns = uint64_t(i);
            s.name = std::string(size_t(i) * 3, 'n');
            trace::write(trace::thread_records(), s);
            trace::emitted();
        }
        event_base_loop(base, EVLOOP_NONBLOCK);  // the turn ends: one hand-off of n spans
    };
    turn(1, 5);
    turn(6, 2);
    turn(8, 3);
    CHECK(trace::Queue::size() == 10);
    auto starts_of = [](const std::string& taken) {
        std::vector<uint64_t> starts;
        for (const char* p = taken.data(); p < taken.data() + taken.size(); p += trace::record_size(p)) {
            otlp::Span span;
            REQUIRE(span.ParseFromArray(trace::span_bytes(p).data(), int(trace::span_bytes(p).size())));
            starts.push_back(span.start_time_unix_nano());
        }
        return starts;
    };
    std::string taken;
    CHECK(trace::Queue::take(taken, 3, 0) == 3);  // inside the first hand-off
    CHECK(starts_of(taken) == std::vector<uint64_t>{1, 2, 3});
    taken.clear();
    CHECK(trace::Queue::take(taken, 5, 0) == 4);  // the rest of it and the next one: 5 would cut the third
    CHECK(starts_of(taken) == std::vector<uint64_t>{4, 5, 6, 7});
    taken.clear();
    CHECK(trace::Queue::take(taken, 100, 0) == 3);
    CHECK(starts_of(taken) == std::vector<uint64_t>{8, 9, 10});
    CHECK(trace::Queue::size() == 0);
    trace::detach_loop();
    event_base_free(base);
}

namespace {
// What the exporter would send of the spans queued so far, decoded by protobuf.
std::vector<otlp::Span> exported() {
    std::string records;
    while (trace::Queue::take(records, 1000, 0)) {}
    std::string buffer;
    std::string message(otlp_exporter::encode({}, records, buffer));
    otlp::ExportTraceServiceRequest decoded;
    REQUIRE(decoded.ParseFromString(message));
    std::vector<otlp::Span> spans;
    if (decoded.resource_spans_size())
        for (auto& s : decoded.resource_spans(0).scope_spans(0).spans()) spans.push_back(s);
    return spans;
}

// A sampled request of our own trace, as RequestTrace::begin leaves it, without a parsed head.
void start_recording(RequestTrace& t, std::string_view method, std::string_view path, std::string_view user_agent) {
    t.active = t.ours = t.recording = true;
    trace::new_trace_id(t.ids.trace_id);
    trace::new_span_id(t.ids.span_id);
    t.rec.reset(new RequestTrace::Recording);
    t.rec->method = method;
    t.rec->path = path;
    t.rec->user_agent = user_agent;
}

std::map<std::string, std::string> attributes(const otlp::Span& s) {
    std::map<std::string, std::string> out;
    for (auto& kv : s.attributes()) {
        auto& v = kv.value();
        out[kv.key()] = v.has_string_value() ? v.string_value()
                        : v.has_int_value()  ? std::to_string(v.int_value())
                                             : std::to_string(v.double_value());
    }
    return out;
}
}  // namespace

TEST_CASE("a request's spans say what the request did", "[trace]") {
    exported();  // what earlier tests left
    RequestTrace t;
    start_recording(t, "POST", "/mcp", "test-agent/1");
    t.note_jsonrpc(R"({"jsonrpc":"2.0","id":7,"method":"tools/call"})");
    t.note_queue_wait(100, 200);
    auto w1 = testing::instance("worker-a", 18081), w2 = testing::instance("worker-b", 18082);
    Failure capacity = Failure::WorkerAtCapacity;
    AttemptSpan first, second, third;
    first.start(&t, *w1, "least-load");
    first.end(503, &capacity, "the worker is at capacity", 10);
    second.start(&t, *w2, "pinned-session");
    second.cancel(0, 0);
    third.start(&t, *w2, "least-load");
    third.end(502, nullptr, {}, 0);
    RequestTrace::Outcome o;
    o.status = 502;
    o.decision = "least-load";
    o.instance_id = "worker-b";
    o.client_ip = "127.0.0.1";
    o.bytes_in = 45;
    o.bytes_out = 3;
    o.retries = 2;
    o.queue_wait_ms = 1.5;
    t.end(o);
    auto spans = exported();
    REQUIRE(spans.size() == 5);
    auto a1 = attributes(spans[0]);
    CHECK(spans[0].kind() == otlp::Span_SpanKind_SPAN_KIND_CLIENT);
    CHECK(a1["server.address"] == "127.0.0.1");
    CHECK(a1["server.port"] == "18081");
    CHECK(a1["stepflow.instance.id"] == "worker-a");
    CHECK(a1["stepflow.attempt"] == "1");
    CHECK(a1["stepflow.failure"] == "worker-at-capacity");
    CHECK(a1["error.type"] == "worker-at-capacity");
    CHECK(a1["http.response.status_code"] == "503");
    CHECK(a1.count("http.request.resend_count") == 0);
    CHECK(spans[0].status().code() == otlp::Status_StatusCode_STATUS_CODE_ERROR);
    CHECK(spans[0].status().message() == "the worker is at capacity");
    auto a2 = attributes(spans[1]);
    CHECK(a2["error.type"] == "cancelled");
    CHECK(a2["stepflow.routing.decision"] == "pinned-session");
    CHECK(a2["http.request.resend_count"] == "1");
    CHECK(spans[1].status().message() == "the client went away");
    CHECK(spans[2].status().message() == "HTTP 502");
    CHECK(spans[2].status().code() == otlp::Status_StatusCode_STATUS_CODE_ERROR);
    CHECK(spans[3].name() == "admission queue");
    CHECK(spans[3].start_time_unix_nano() == 100);
    CHECK(spans[3].end_time_unix_nano() == 200);
    CHECK(spans[3].parent_span_id() == std::string(reinterpret_cast<const char*>(t.ids.span_id), 8));
    auto s = attributes(spans[4]);
    CHECK(spans[4].kind() == otlp::Span_SpanKind_SPAN_KIND_SERVER);
    CHECK(spans[4].name() == "POST");
    CHECK(spans[4].status().message() == "HTTP 502");
    CHECK(s["url.path"] == "/mcp");
    CHECK(s["user_agent.original"] == "test-agent/1");
    CHECK(s["stepflow.attempts"] == "3");
    CHECK(s["stepflow.retries"] == "2");
    CHECK(s["http.request.body.size"] == "45");
    CHECK(s["rpc.system"] == "jsonrpc");
    CHECK(s["rpc.method"] == "tools/call");
    CHECK(s["rpc.jsonrpc.request_id"] == "7");
    CHECK(s["network.peer.address"] == "127.0.0.1");
    for (auto& span : spans) CHECK(span.trace_id() == std::string(reinterpret_cast<const char*>(t.ids.trace_id), 16));
}

TEST_CASE("a request whose path and headers are not UTF-8 exports spans protobuf accepts", "[trace]") {
    // Protobuf strings must be UTF-8 (proto3 parsing refuses the whole message otherwise, as
    // collectors that check do): what is not shows U+FFFD, one per maximal subpart.
    exported();
    trace::Settings on;
    on.enabled = true;
    trace::configure(on);
    http1::Head head;
    head.raw = "GET /caf\xe9/\xe2\x9c\x93?q=\xff HTTP/1.1\r\nHost: lb\r\nUser-Agent: agent\xff\xfe/1 \xf0\x9f\x98\r\n"
               "Mcp-Method: tools/\xc0\xaf" "call\r\n\r\n";
    REQUIRE_FALSE(http1::parse_request(head, http1::Limits{}));
    RequestTrace t;
    t.begin(head);
    REQUIRE(t.recording);
    auto w = testing::instance("worker-a", 18081);
    AttemptSpan attempt;
    attempt.start(&t, *w, "least-load");
    attempt.end(502, nullptr, {}, 0);
    RequestTrace::Outcome o;
    o.status = 502;
    o.decision = "least-load";
    o.client_ip = "127.0.0.1";
    t.end(o);
    trace::configure(trace::Settings{});
    auto spans = exported();  // parsed by protobuf, which checks every string
    REQUIRE(spans.size() == 2);
    auto s = attributes(spans[1]);
    CHECK(s["url.path"] == "/caf\xef\xbf\xbd/\xe2\x9c\x93");
    CHECK(attributes(spans[0])["url.path"] == "/caf\xef\xbf\xbd/\xe2\x9c\x93");
    CHECK(s["user_agent.original"] == "agent\xef\xbf\xbd\xef\xbf\xbd/1 \xef\xbf\xbd");
    CHECK(s["mcp.method.name"] == "tools/\xef\xbf\xbd\xef\xbf\xbd" "call");
}

TEST_CASE("two traceparent fields start a new trace, one is continued", "[trace]") {
    trace::Settings on;
    on.enabled = true;
    trace::configure(on);
    const std::string one = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n";
    const std::string two = "TraceParent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n";
    for (const std::string& fields : {one, one + two, one + one}) {
        http1::Head head;
        head.raw = "GET / HTTP/1.1\r\nHost: lb\r\n" + fields + "\r\n";
        REQUIRE_FALSE(http1::parse_request(head, http1::Limits{}));
        RequestTrace t;
        t.begin(head);
        std::string id = hex(t.ids.trace_id, 16);
        INFO(fields);
        if (fields == one) {
            CHECK((t.has_parent && id == "4bf92f3577b34da6a3ce929d0e0e4736"));
        } else {
            CHECK(!t.has_parent);
            CHECK((id != "4bf92f3577b34da6a3ce929d0e0e4736" && id != "0af7651916cd43dd8448eb211c80319c"));
        }
        t.end({});
    }
    trace::configure(trace::Settings{});
    exported();
}

TEST_CASE("a collector's partial success and Retry-After are read", "[trace]") {
    otlp::ExportTraceServiceResponse response;
    response.mutable_partial_success()->set_rejected_spans(3);
    response.mutable_partial_success()->set_error_message("spans older than 1h");
    otlp_exporter::PartialSuccess p;
    REQUIRE(otlp_exporter::decode_response(response.SerializeAsString(), p));
    CHECK(p.rejected_spans == 3);
    CHECK(p.error_message == "spans older than 1h");
    // An empty response (full success), one with fields we do not know, and bytes that are not one.
    CHECK(otlp_exporter::decode_response("", p));
    CHECK(p.rejected_spans == 0);
    std::string unknown = response.SerializeAsString() + std::string("\x10\x07\x1d\x01\x02\x03\x04", 7);
    CHECK(otlp_exporter::decode_response(unknown, p));
    CHECK(p.rejected_spans == 3);
    CHECK_FALSE(otlp_exporter::decode_response(std::string("\x0a\x05\x08", 3), p));  // cut short
    CHECK_FALSE(otlp_exporter::decode_response(std::string("\x0b", 1), p));          // a group
    CHECK(otlp_exporter::retry_after("2") == std::chrono::seconds(2));
    CHECK(otlp_exporter::retry_after(" 120 ") == std::chrono::seconds(120));
    // An HTTP-date in each of the three forms a recipient must read, 30 s after `now`; one gone
    // by; near misses that are none of them.
    auto now = std::chrono::system_clock::from_time_t(1792567650);  // Wed, 21 Oct 2026 07:27:30 GMT
    CHECK(otlp_exporter::retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now) == std::chrono::seconds(30));
    CHECK(otlp_exporter::retry_after("Wednesday, 21-Oct-26 07:28:00 GMT", now) == std::chrono::seconds(30));
    CHECK(otlp_exporter::retry_after("Wed Oct 21 07:28:00 2026", now) == std::chrono::seconds(30));
    CHECK(otlp_exporter::retry_after("Wed Oct  1 07:28:00 2026", now) == std::chrono::seconds(0));  // gone by
    CHECK(otlp_exporter::retry_after("Wed, 21 Oct 2026 07:28:00 GMT", now + std::chrono::hours(1)) ==
          std::chrono::seconds(0));
    CHECK(otlp_exporter::retry_after("Wed, 21 Oct 2026 07:28:00", now) == std::chrono::seconds(0));   // no zone
    CHECK(otlp_exporter::retry_after("Wed, 21 Oct 2026 07:28:00 GMTx", now) == std::chrono::seconds(0));
    CHECK(otlp_exporter::retry_after("soon", now) == std::chrono::seconds(0));
    CHECK(otlp_exporter::retry_after("2 s", now) == std::chrono::seconds(0));
    CHECK(otlp_exporter::retry_after("-1") == std::chrono::seconds(0));
    CHECK(otlp_exporter::retry_after("") == std::chrono::seconds(0));
    CHECK(otlp_exporter::retry_after("99999999999") == std::chrono::seconds(0));
    // gRPC: google.rpc.Status{code 8, "busy", details [Any{RetryInfo{retry_delay 3 s}}]}, padded or
    // not; a RetryInfo after another detail, with nanos (1.5 s: rounded up); none; not base64.
    CHECK(otlp_exporter::grpc_retry_delay("CAgSBGJ1c3kaMAoodHlwZS5nb29nbGVhcGlzLmNvbS9nb29nbGUucnBjLlJldHJ5SW5mbxIECgIIAw==") ==
          std::chrono::seconds(3));
    CHECK(otlp_exporter::grpc_retry_delay("CAgSBGJ1c3kaMAoodHlwZS5nb29nbGVhcGlzLmNvbS9nb29nbGUucnBjLlJldHJ5SW5mbxIECgIIAw") ==
          std::chrono::seconds(3));
    CHECK(otlp_exporter::grpc_retry_delay("CA4aLwoodHlwZS5nb29nbGVhcGlzLmNvbS9nb29nbGUucnBjLkRlYnVnSW5mbxIDCgF4GjYKKHR5cGUu"
                                          "Z29vZ2xlYXBpcy5jb20vZ29vZ2xlLnJwYy5SZXRyeUluZm8SCgoICAEQgMq17gE=") == std::chrono::seconds(2));
    CHECK(otlp_exporter::grpc_retry_delay("CAgSBGJ1c3k=") == std::chrono::seconds(0));  // no details
    CHECK(otlp_exporter::grpc_retry_delay("not base64!") == std::chrono::seconds(0));
    // Why it refused: grpc-message percent-decoded; an OTLP/HTTP error's google.rpc.Status.
    CHECK(percent_decode("refusing%20on%20purpose") == "refusing on purpose");
    CHECK(percent_decode("100% sure %e2%9c%93 %zz %4") == "100% sure \xe2\x9c\x93 %zz %4");
    CHECK(otlp_exporter::status_message(std::string("\x08\x03\x12\x09" "bad spans", 13)) == "bad spans");
    CHECK(otlp_exporter::status_message("{\"error\":\"not protobuf\"}").empty());
}

TEST_CASE("ids are written as two lowercase hex characters per byte, every byte value", "[trace]") {
    uint8_t all[256];
    std::string want;
    for (int b = 0; b < 256; ++b) {
        all[b] = uint8_t(b);
        char two[3];
        std::snprintf(two, sizeof two, "%02x", b);
        want += two;
    }
    CHECK(hex(all, 256) == want);
    char traceparent[56] = {};
    const uint8_t trace_id[16] = {0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36};
    const uint8_t span_id[8] = {0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7};
    trace::format_traceparent(trace_id, span_id, 1, traceparent);
    CHECK(std::string(traceparent, 55) == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
}
