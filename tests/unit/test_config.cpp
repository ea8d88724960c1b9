#include <catch2/catch.hpp>

#include "core/config.h"
#include "core/net.h"

using namespace stepflow;

TEST_CASE("durations take units or bare seconds", "[config]") {
    Millis ms{};
    CHECK(parse_duration("250ms", ms));
    CHECK(ms.count() == 250);
    CHECK(parse_duration("1", ms));
    CHECK(ms.count() == 1000);
    CHECK(parse_duration("0.5", ms));
    CHECK(ms.count() == 500);
    CHECK(parse_duration("2m", ms));
    CHECK(ms.count() == 120000);
    CHECK(parse_duration("1h", ms));
    CHECK(ms.count() == 3600000);
    CHECK(parse_duration("0", ms));
    CHECK(ms.count() == 0);
    for (const char* bad : {"", "abc", "-1", "10x", "5 s", "ms", "+3", " 1"}) {
        INFO(bad);
        CHECK_FALSE(parse_duration(bad, ms));
    }
}

TEST_CASE("host:port parsing covers IPv4, IPv6 and names", "[config]") {
    HostPort hp;
    CHECK(parse_host_port("127.0.0.1:80", hp));
    CHECK(hp.host == "127.0.0.1");
    CHECK(hp.port == 80);
    CHECK(parse_host_port("[::1]:8080", hp));
    CHECK(hp.host == "::1");
    CHECK(parse_host_port("worker.ns.svc:8000", hp));
    for (const char* bad : {"", "host", ":80", "host:", "host:99999", "::1:80", "[::1]80", "h:8a"}) {
        INFO(bad);
        CHECK_FALSE(parse_host_port(bad, hp));
    }
}
