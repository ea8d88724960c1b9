// Micro-benchmark of the routing decision (proxy/router.h) on fleets of 10, 100, 1,000 and 5,000
// instances: pinned lookup by instance id and least-load choice. Run with bench/route.sh.
#include <benchmark/benchmark.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "discovery/fleet.h"
#include "proxy/router.h"

using namespace stepflow;

namespace {

// Ids shaped like the workers' own: "<pod-name>-<random hex>".
std::string instance_id(size_t i, Rng& rng) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "langflow-worker-7d9f8c6b5-%05zx-%016llx", i,
                  static_cast<unsigned long long>(rng.next()));
    return buf;
}

struct Setup {
    FleetPtr fleet;
    std::vector<std::string> ids;  // copies, as a request header would hold them
};

// `draining_every`: every k-th instance is draining (takes pinned work, no new work); 0 = none.
// `active_every`: only every k-th instance takes new work, the others are draining; 0 = all.
Setup make_setup(size_t n, size_t draining_every = 0, size_t active_every = 0) {
    Rng rng(42);
    std::vector<InstancePtr> instances;
    Setup s;
    for (size_t i = 0; i < n; ++i) {
        sockaddr_in sin{};
        sin.sin_family = AF_INET;
        sin.sin_port = htons(8080);
        sin.sin_addr.s_addr = htonl(0x0a000000u + uint32_t(i) + 1);
        sockaddr_storage ss{};
        std::memcpy(&ss, &sin, sizeof sin);
        char addr[32];
        std::snprintf(addr, sizeof addr, "10.0.%zu.%zu:8080", (i + 1) >> 8, (i + 1) & 255);
        auto inst = std::make_shared<Instance>(instance_id(i, rng), addr, ss, socklen_t(sizeof sin),
                                               "langflow-worker-" + std::to_string(i));
        inst->in_flight.store(int(rng.below(5)));  // 0..4, the workers' default concurrency
        if ((draining_every && i % draining_every == 0) || (active_every && i % active_every != 0))
            inst->membership.store(Membership::Draining);
        s.ids.push_back(inst->id);
        instances.push_back(std::move(inst));
    }
    // Look the ids up in a shuffled order so each lookup misses the previous one's cache lines.
    for (size_t i = s.ids.size(); i > 1; --i) std::swap(s.ids[i - 1], s.ids[rng.below(i)]);
    s.fleet = make_fleet(1, std::move(instances));
    return s;
}

void BM_RoutePinned(benchmark::State& state) {
    Setup s = make_setup(size_t(state.range(0)));
    size_t i = 0;
    PinnedMiss why{};
    for (auto _ : state) {
        Instance* inst = route_pinned(*s.fleet, s.ids[i], why);
        benchmark::DoNotOptimize(inst);
        if (++i == s.ids.size()) i = 0;
    }
}

void BM_RoutePinnedUnknown(benchmark::State& state) {
    Setup s = make_setup(size_t(state.range(0)));
    std::string gone = "langflow-worker-7d9f8c6b5-zzzzz-0000000000000000";
    PinnedMiss why{};
    for (auto _ : state) {
        Instance* inst = route_pinned(*s.fleet, gone, why);
        benchmark::DoNotOptimize(inst);
    }
}

void BM_RouteLeastLoad(benchmark::State& state) {
    Setup s = make_setup(size_t(state.range(0)));
    Rng rng(7);
    for (auto _ : state) {
        Instance* inst = route_least_load(*s.fleet, rng);
        benchmark::DoNotOptimize(inst);
    }
}

// The retry path: the first two choices failed to connect, find the third.
void BM_RouteLeastLoadFallback(benchmark::State& state) {
    Setup s = make_setup(size_t(state.range(0)));
    Rng rng(7);
    for (auto _ : state) {
        Instance* tried[3] = {};
        tried[0] = route_least_load(*s.fleet, rng);
        tried[1] = route_least_load(*s.fleet, rng, std::span<Instance* const>(tried, 1));
        tried[2] = route_least_load(*s.fleet, rng, std::span<Instance* const>(tried, 2));
        benchmark::DoNotOptimize(tried[2]);
    }
}

// A rolling update: half of the fleet is draining and must be skipped.
void BM_RouteLeastLoadHalfDraining(benchmark::State& state) {
    Setup s = make_setup(size_t(state.range(0)), 2);
    Rng rng(7);
    for (auto _ : state) {
        Instance* inst = route_least_load(*s.fleet, rng);
        benchmark::DoNotOptimize(inst);
    }
}

// Most of the fleet cannot take new work (nine in ten draining or unhealthy): random probes
// rarely find two candidates, so the choice falls back to the exact scan.
void BM_RouteLeastLoadOneInTenActive(benchmark::State& state) {
    Setup s = make_setup(size_t(state.range(0)), 0, 10);
    Rng rng(7);
    for (auto _ : state) {
        Instance* inst = route_least_load(*s.fleet, rng);
        benchmark::DoNotOptimize(inst);
    }
}

}  // namespace

BENCHMARK(BM_RoutePinned)->Arg(10)->Arg(100)->Arg(1000)->Arg(5000);
BENCHMARK(BM_RoutePinnedUnknown)->Arg(10)->Arg(100)->Arg(1000)->Arg(5000);
BENCHMARK(BM_RouteLeastLoad)->Arg(10)->Arg(64)->Arg(100)->Arg(1000)->Arg(5000);  // 64: largest exact scan
BENCHMARK(BM_RouteLeastLoadFallback)->Arg(10)->Arg(100)->Arg(1000)->Arg(5000);
BENCHMARK(BM_RouteLeastLoadHalfDraining)->Arg(10)->Arg(100)->Arg(1000)->Arg(5000);
BENCHMARK(BM_RouteLeastLoadOneInTenActive)->Arg(10)->Arg(100)->Arg(1000)->Arg(5000);

BENCHMARK_MAIN();
