#include <catch2/catch.hpp>

#include <cstring>
#include <string>

#include "core/trace_context.h"
#include "proxy/otlp_exporter.h"

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
