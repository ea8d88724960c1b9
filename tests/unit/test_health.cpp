#include <catch2/catch.hpp>

#include <chrono>
#include <cstring>
#include <memory>

#include <event2/buffer.h>
#include <event2/event.h>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "discovery/health_probe.h"
#include "discovery/instance.h"
#include "proxy/local_response.h"

using namespace stepflow;

TEST_CASE("health bodies: healthy with an instanceId", "[health]") {
    auto r = parse_health_body(200, R"({"status":"healthy","instanceId":"pod-a-12ab","inFlight":0})");
    CHECK(r.healthy);
    CHECK(r.instance_id == "pod-a-12ab");
}

TEST_CASE("health bodies: failures say why", "[health]") {
    CHECK_FALSE(parse_health_body(503, R"({"status":"healthy"})").healthy);
    CHECK_FALSE(parse_health_body(200, "not json").healthy);
    CHECK_FALSE(parse_health_body(200, "[1,2]").healthy);
    auto r = parse_health_body(200, R"({"status":"unhealthy","instanceId":"x"})");
    CHECK_FALSE(r.healthy);
    CHECK(r.error.find("unhealthy") != std::string::npos);
    CHECK_FALSE(parse_health_body(200, R"({"instanceId":5})").healthy);
    CHECK(parse_health_body(200, R"({})").healthy);  // healthy, but names no id
    CHECK_FALSE(parse_health_body(200, R"({})").has_instance_id);
}

TEST_CASE("JSON-RPC ids are echoed safely", "[local]") {
    auto id_of = [](const std::string& body) {
        evbuffer* b = evbuffer_new();
        evbuffer_add(b, body.data(), body.size());
        std::string id = jsonrpc_id_of(b);
        evbuffer_free(b);
        return id;
    };
    CHECK(id_of(R"({"jsonrpc":"2.0","id":7,"method":"x"})") == "7");
    CHECK(id_of(R"({"jsonrpc":"2.0","id":"a\"b","method":"x"})") == R"("a\"b")");
    CHECK(id_of(R"({"jsonrpc":"2.0","method":"x"})") == "null");
    CHECK(id_of("garbage") == "null");
    CHECK(id_of(R"({"id":{"x":1}})") == "null");
    CHECK(jsonrpc_error("1", -32000, "Instance not available", "\"instanceId\":\"a\"") ==
          R"({"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"Instance not available","data":{"instanceId":"a"}}})");
}

TEST_CASE("stepflow mode refuses missing and unusable instance ids") {
    std::string id, why;
    CHECK_FALSE(stepflow_instance_id(parse_health_body(200, R"({"status":"healthy"})"), id, why));
    CHECK(why.find("names no instanceId") != std::string::npos);
    CHECK_FALSE(stepflow_instance_id(parse_health_body(200, R"({"instanceId":""})"), id, why));
    CHECK_FALSE(stepflow_instance_id(parse_health_body(200, R"({"instanceId":"a b"})"), id, why));
    CHECK_FALSE(stepflow_instance_id(parse_health_body(200, R"({"instanceId":"a\r\nX-Evil: 1"})"), id, why));
    CHECK_FALSE(stepflow_instance_id(parse_health_body(200, "{\"instanceId\":\"" + std::string(254, 'a') + "\"}"), id, why));
    CHECK(stepflow_instance_id(parse_health_body(200, "{\"instanceId\":\"" + std::string(253, 'a') + "\"}"), id, why));
    CHECK(stepflow_instance_id(parse_health_body(200, R"({"instanceId":"pod-a-12ab"})"), id, why));
    CHECK(id == "pod-a-12ab");
}

TEST_CASE("live successes do not erase failed checks; an instance returns after rise checks") {
    sockaddr_storage addr{};
    Instance inst("i", "127.0.0.1:1", addr, sizeof(sockaddr_in), "");
    CHECK_FALSE(inst.record_check_failure(3, "503"));
    inst.record_success();
    CHECK_FALSE(inst.record_check_failure(3, "503"));
    inst.record_success();
    CHECK(inst.record_check_failure(3, "503"));
    CHECK_FALSE(inst.healthy.load());
    CHECK_FALSE(inst.record_check_success(2));
    CHECK_FALSE(inst.healthy.load());
    CHECK(inst.record_check_success(2));
    CHECK(inst.healthy.load());
}

TEST_CASE("judge_health: stepflow mode needs an instanceId, http mode any 2xx") {
    auto r = judge_health(HealthCheck::Stepflow, 200, R"({"status":"ok"})");
    CHECK_FALSE(r.healthy);
    CHECK(r.config_error);
    CHECK(r.error.find("--health-check http") != std::string::npos);
    CHECK(judge_health(HealthCheck::Stepflow, 404, "").error.find("--health-check") != std::string::npos);
    CHECK(judge_health(HealthCheck::Stepflow, 200, R"({"instanceId":"w1"})").healthy);
    CHECK(judge_health(HealthCheck::Http, 204, "").healthy);
    CHECK(judge_health(HealthCheck::Http, 200, "not json").healthy);
    CHECK_FALSE(judge_health(HealthCheck::Http, 503, "").healthy);
    CHECK_FALSE(judge_health(HealthCheck::Http, 302, "").healthy);
}

// A probe of a loopback port nobody listens on: every check fails at once (connection refused).
TEST_CASE("a shorter check interval brings the pending check forward; a longer one waits a tick", "[health]") {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
    socklen_t sin_len = sizeof sin;
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&sin), &sin_len) == 0);
    ::close(fd);  // bound, never listened: the port refuses connections
    sockaddr_storage addr{};
    std::memcpy(&addr, &sin, sizeof sin);

    using std::chrono::milliseconds;
    event_base* base = event_base_new();
    int checks = 0;
    std::unique_ptr<HealthProbe> probe;
    probe = std::make_unique<HealthProbe>(base, addr, socklen_t(sizeof sin), "127.0.0.1", milliseconds(60000),
                                          milliseconds(1000), nullptr, [&](const HealthResult& r) {
                                              CHECK_FALSE(r.healthy);
                                              ++checks;
                                              // 1: the next tick is 60 s away; shortening brings it to 20 ms.
                                              if (checks == 1) probe->set_interval(milliseconds(20));
                                              // 2: lengthening keeps the tick already armed (20 ms away).
                                              if (checks == 2) probe->set_interval(milliseconds(60000));
                                              // 3: now 60 s away; a check on demand comes at once.
                                              if (checks == 3) probe->check_now();
                                              if (checks == 4) event_base_loopbreak(base);
                                          });
    probe->start();
    timeval guard{10, 0};  // without the rescheduling the second check would come after 60 s
    event_base_loopexit(base, &guard);
    event_base_dispatch(base);
    CHECK(checks == 4);
    CHECK(probe->interval() == milliseconds(60000));
    probe.reset();
    event_base_free(base);
}
