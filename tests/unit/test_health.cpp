#include <catch2/catch.hpp>

#include <event2/buffer.h>

#include "discovery/health_probe.h"
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
    CHECK(parse_health_body(200, R"({})").healthy);  // no id: the address stands in
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
