#include <catch2/catch.hpp>

#include "core/net.h"
#include "discovery/fleet.h"
#include "proxy/demand.h"
#include "tests/unit/instances.h"
#include "proxy/peers.h"

using namespace stepflow;

using stepflow::testing::instance;

TEST_CASE("demand: new work on every instance; capacity only where a limit is known", "[demand]") {
    auto limited = instance("limited", 10101), unlimited = instance("unlimited", 10102),
         draining = instance("draining", 10103);
    auto take = [](const InstancePtr& inst, int n) {
        for (int i = 0; i < n; ++i) REQUIRE(inst->capacity.try_take());
    };
    limited->capacity.set_flag(4);
    take(limited, 3);
    limited->in_flight = 9;  // pinned work (callback answers) is not demand
    take(unlimited, 2);
    draining->capacity.set_flag(2);
    take(draining, 1);  // still running: demand, but not routable capacity
    draining->membership = Membership::Draining;
    FleetPtr fleet = make_fleet(1, {limited, unlimited, draining});
    Demand d = measure_demand(*fleet);
    CHECK(d.in_flight == 6);
    CHECK(d.routable == 2);
    CHECK(d.slots == 4);
    CHECK(d.slots_used == 3);
    CHECK(d.total() == d.queued + 6);
}

TEST_CASE("a brand-new instance is routable at once; rise applies only once it was unhealthy", "[demand]") {
    auto inst = instance("new", 10104);
    CHECK(inst->takes_new_work());
    CHECK_FALSE(inst->record_check_success(5));  // already healthy: nothing to rise from
    CHECK(inst->takes_new_work());
    for (int i = 0; i < 3; ++i) inst->record_check_failure(3, "down");
    CHECK_FALSE(inst->takes_new_work());
    for (int i = 0; i < 4; ++i) CHECK_FALSE(inst->record_check_success(5));
    CHECK(inst->record_check_success(5));
    CHECK(inst->takes_new_work());
}

TEST_CASE("a peer's /demand answer", "[demand]") {
    uint64_t v = 0;
    CHECK(Peers::parse_demand("HTTP/1.1 200 OK\r\n\r\n{\"demand\":17,\"queued\":2,\"inFlight\":15}", v));
    CHECK(v == 17);
    CHECK(Peers::parse_demand("{\"demand\":0}", v));
    CHECK(v == 0);
    CHECK_FALSE(Peers::parse_demand("{\"queued\":3}", v));
    CHECK_FALSE(Peers::parse_demand("{\"demand\":\"x\"}", v));
}
