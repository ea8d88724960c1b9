#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <thread>

#include "discovery/capacity.h"

using namespace stepflow;

namespace {

void take(InstanceCapacity& c, int n) {
    for (int i = 0; i < n; ++i) REQUIRE(c.try_take());
}

std::string state(const InstanceCapacity& c) { return c.state(); }

}  // namespace

TEST_CASE("capacity: the worker's report wins over the flag; no report means no limit", "[capacity]") {
    InstanceCapacity c;
    CHECK(c.limit() == 0);
    CHECK(c.source() == LimitSource::None);
    CHECK(c.free_slots() == InstanceCapacity::kUnlimited);
    c.set_flag(8);
    CHECK(c.limit() == 8);
    CHECK(c.source() == LimitSource::Flag);
    c.report(4, LimitSource::Health, 1000);
    CHECK(c.limit() == 4);
    CHECK(c.source() == LimitSource::Health);
    c.report(0, LimitSource::Header, 1100);  // not a report
    CHECK(c.source() == LimitSource::Health);
    c.report(6, LimitSource::Header, 1200);  // the last report counts, whichever carried it
    CHECK(c.limit() == 6);
    CHECK(c.source() == LimitSource::Header);
    take(c, 6);
    CHECK_FALSE(c.has_room());
    CHECK_FALSE(c.try_take());
    CHECK(c.free_slots() == 0);
    c.release();
    CHECK(c.free_slots() == 1);
}

TEST_CASE("capacity: a refusal cuts the limit to the slots in use minus the refused one", "[capacity]") {
    InstanceCapacity c;
    c.report(4, LimitSource::Health, 1);
    take(c, 3);
    c.refused(1000, 1000);  // three of ours on it, this one included: two fit
    CHECK(c.limit() == 2);
    CHECK(c.source() == LimitSource::Learned);
    CHECK(state(c) == "recovering");
    CHECK(c.refusals() == 1);
    c.release();  // the refused request lets go of its slot
    CHECK_FALSE(c.has_room());
    // A second refusal at or under the cut cuts below it.
    c.refused(1100, 1000);
    CHECK(c.limit() == 1);
    CHECK(c.refusals() == 2);
    c.answered();
    CHECK(c.refusals() == 0);
}

TEST_CASE("capacity: recovery is multiplicative toward the reported limit", "[capacity]") {
    InstanceCapacity c;
    c.report(100, LimitSource::Health, 1);
    take(c, 4);
    c.refused(0, 1000);  // 3 fit
    CHECK(c.limit() == 3);
    CHECK_FALSE(c.tick(500, 1000));  // not quiet long enough
    CHECK(c.limit() == 3);
    int64_t now = 0;
    int steps = 0;
    while (c.source() == LimitSource::Learned && steps < 100) {
        now += 1000;
        CHECK(c.tick(now, 1000));
        ++steps;
    }
    CHECK(c.limit() == 100);
    CHECK(c.source() == LimitSource::Health);
    CHECK(steps <= 6);  // 3, 6, 12, 24, 48, 96, then the base: not 97 seconds
    CHECK_FALSE(c.tick(now + 5000, 1000));  // nothing left to grow
}

TEST_CASE("capacity: with the configured limit, recovery stops at the flag", "[capacity]") {
    InstanceCapacity c;
    c.set_flag(5);
    take(c, 2);
    c.refused(0, 1000);
    CHECK(c.limit() == 1);
    CHECK(state(c) == "probing");
    CHECK(c.tick(1000, 1000));
    CHECK(c.limit() == 2);
    CHECK(c.tick(2000, 1000));
    CHECK(c.limit() == 4);
    CHECK(c.tick(3000, 1000));
    CHECK(c.limit() == 5);
    CHECK(c.source() == LimitSource::Flag);
}

TEST_CASE("capacity: with no limit known, a cut grows back to twice itself and goes", "[capacity]") {
    InstanceCapacity c;
    take(c, 3);
    c.refused(0, 1000);
    CHECK(c.limit() == 2);
    CHECK(c.tick(1000, 1000));
    CHECK(c.limit() == 4);
    CHECK(c.tick(2000, 1000));
    CHECK(c.limit() == 0);
    CHECK(c.source() == LimitSource::None);
}

TEST_CASE("capacity: a refusal with nothing else of ours on it gives zero slots, then one probe", "[capacity]") {
    InstanceCapacity c;
    c.report(100, LimitSource::Health, 1);
    take(c, 1);
    c.refused(5000, 1000);
    c.release();
    CHECK(state(c) == "cooling");
    CHECK(c.cooling());
    CHECK(c.view(5400).cooling_ms == 600);
    CHECK(c.limit() == 1);  // the probe slot it will get
    CHECK(c.free_slots() == 0);
    CHECK_FALSE(c.has_room());
    CHECK_FALSE(c.try_take());
    CHECK_FALSE(c.tick(5900, 1000));  // still cooling
    CHECK_FALSE(c.try_take());
    CHECK(c.tick(6000, 1000));  // the probe slot opens
    CHECK(state(c) == "probing");
    CHECK(c.try_take());
    CHECK_FALSE(c.try_take());  // one probe at a time
    // The probe is refused too: cooling again, not tried by every request.
    c.refused(6100, 1000);
    c.release();
    CHECK(state(c) == "cooling");
    CHECK(c.refusals() == 2);
    CHECK_FALSE(c.try_take());
    CHECK(c.tick(7100, 1000));
    take(c, 1);
    c.answered();  // the probe succeeded
    c.release();
    CHECK(c.refusals() == 0);
    CHECK(c.tick(8100, 1000));
    CHECK(c.limit() == 2);
    CHECK(state(c) == "recovering");
}

TEST_CASE("capacity: a report that stops falls back to the flag after its TTL", "[capacity]") {
    InstanceCapacity c;
    c.set_flag(8);
    c.report(50, LimitSource::Header, 1000);
    CHECK(c.limit() == 50);
    c.tick(5000, 1000, 10000);
    CHECK(c.limit() == 50);  // still fresh
    c.report(50, LimitSource::Header, 6000);  // renewed: the TTL runs from here
    c.tick(15000, 1000, 10000);
    CHECK(c.limit() == 50);
    c.tick(16000, 1000, 10000);
    CHECK(c.limit() == 8);
    CHECK(c.source() == LimitSource::Flag);
    CHECK(c.view(16000).flag_limit == 8);
    take(c, 8);
    CHECK_FALSE(c.try_take());  // the flag is enforced again
    // Without a flag, a stale report means no limit at all.
    InstanceCapacity u;
    u.report(3, LimitSource::Health, 1000);
    u.tick(11000, 1000, 10000);
    CHECK(u.limit() == 0);
    CHECK(u.source() == LimitSource::None);
    // The flag itself never expires.
    InstanceCapacity f;
    f.set_flag(2);
    f.tick(1000000, 1000, 10000);
    CHECK(f.limit() == 2);
}

TEST_CASE("capacity: take and release from two threads keep the count exact under a changing limit", "[capacity]") {
    InstanceCapacity c;
    c.set_flag(3);
    std::atomic<int> held{0}, most{0};
    std::atomic<bool> stop{false};
    constexpr int kRounds = 200000;
    auto requests = [&] {
        int taken = 0;
        for (int i = 0; i < kRounds; ++i) {
            if (!c.try_take()) continue;
            ++taken;
            int now = held.fetch_add(1) + 1;
            int m = most.load();
            while (now > m && !most.compare_exchange_weak(m, now)) {
            }
            held.fetch_sub(1);
            c.release();
        }
        return taken;
    };
    // Meanwhile the sources change the limit in the upper half of the same word.
    std::thread control([&] {
        int64_t now = 1;
        while (!stop.load()) {
            c.report(2 + int(now % 2), LimitSource::Header, now);
            c.tick(now, 1);
            ++now;
        }
    });
    int taken_a = 0, taken_b = 0;
    std::thread a([&] { taken_a = requests(); });
    std::thread b([&] { taken_b = requests(); });
    a.join();
    b.join();
    stop = true;
    control.join();
    CHECK(c.in_use() == 0);  // every take released: nothing lost, nothing counted twice
    CHECK(taken_a + taken_b > 0);
    CHECK(most.load() <= 3);  // never more than the largest limit in force
    CHECK(c.limit() >= 2);
    CHECK(c.limit() <= 3);
}
