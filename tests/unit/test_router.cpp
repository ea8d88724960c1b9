#include <catch2/catch.hpp>

#include <map>

#include "core/net.h"
#include "discovery/fleet.h"
#include "proxy/router.h"
#include "tests/unit/instances.h"

using namespace stepflow;

namespace {

FleetPtr fleet_of(size_t n) {
    std::vector<InstancePtr> instances;
    for (size_t i = 0; i < n; ++i) {
        instances.push_back(testing::instance("inst-" + std::to_string(i), static_cast<uint16_t>(10000 + i)));
    }
    return make_fleet(1, std::move(instances));
}

}  // namespace

TEST_CASE("least-load picks the instance with the fewest in flight", "[router]") {
    auto fleet = fleet_of(3);
    Rng rng(42);
    fleet->instances[0]->in_flight = 5;
    fleet->instances[1]->in_flight = 1;
    fleet->instances[2]->in_flight = 3;
    for (int i = 0; i < 20; ++i) CHECK(route_least_load(*fleet, rng) == fleet->instances[1].get());
}

TEST_CASE("least-load breaks ties at random across all tied instances", "[router]") {
    auto fleet = fleet_of(4);
    Rng rng(7);
    fleet->instances[3]->in_flight = 1;
    std::map<Instance*, int> picks;
    for (int i = 0; i < 3000; ++i) ++picks[route_least_load(*fleet, rng)];
    CHECK(picks.count(fleet->instances[3].get()) == 0);
    for (int i = 0; i < 3; ++i) CHECK(picks[fleet->instances[size_t(i)].get()] > 800);
}

TEST_CASE("least-load skips unhealthy, draining and already-tried instances", "[router]") {
    auto fleet = fleet_of(4);
    Rng rng(1);
    fleet->instances[0]->healthy = false;
    fleet->instances[1]->membership = Membership::Draining;
    std::vector<Instance*> tried{fleet->instances[2].get()};
    CHECK(route_least_load(*fleet, rng, tried) == fleet->instances[3].get());
    tried.push_back(fleet->instances[3].get());
    CHECK(route_least_load(*fleet, rng, tried) == nullptr);
}

TEST_CASE("large fleets use two random choices and still find the only eligible instance", "[router]") {
    auto fleet = fleet_of(1000);
    Rng rng(3);
    for (auto& i : fleet->instances) i->in_flight = 10;
    fleet->instances[500]->in_flight = 0;
    // Power of two choices prefers lighter instances: the average load of picks is below 10.
    int light = 0;
    for (int i = 0; i < 20000; ++i)
        if (route_least_load(*fleet, rng)->in_flight == 0) ++light;
    CHECK(light > 10);
    for (auto& i : fleet->instances) i->healthy = false;
    fleet->instances[999]->healthy = true;
    CHECK(route_least_load(*fleet, rng) == fleet->instances[999].get());
}

TEST_CASE("pinned routing names its misses", "[router]") {
    auto fleet = fleet_of(2);
    PinnedMiss why{};
    CHECK(route_pinned(*fleet, "inst-1", why) == fleet->instances[1].get());
    CHECK(route_pinned(*fleet, "nope", why) == nullptr);
    CHECK(why == PinnedMiss::UnknownInstance);
    fleet->instances[1]->membership = Membership::Draining;
    CHECK(route_pinned(*fleet, "inst-1", why) == fleet->instances[1].get());
    fleet->instances[1]->membership = Membership::NotServing;
    CHECK(route_pinned(*fleet, "inst-1", why) == nullptr);
    CHECK(why == PinnedMiss::NotServing);
    fleet->instances[0]->healthy = false;
    CHECK(route_pinned(*fleet, "inst-0", why) == nullptr);
}

TEST_CASE("a reader's view follows published snapshots", "[fleet]") {
    FleetPublisher pub;
    FleetView view(pub);
    CHECK(view.get().instances.empty());
    auto f = fleet_of(2);
    pub.publish(f);
    CHECK(view.get().instances.size() == 2);
    CHECK(view.get().find("inst-0") != nullptr);
}
