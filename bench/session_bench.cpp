// Micro-benchmark of what --session-header adds per request (proxy/session_table.h,
// proxy/session_seal.h): a learned-table lookup and remember at 1,000 to 1,000,000 sessions, and
// sealing / unsealing an id (AES-256-GCM) for a 64-byte backend id. Run with bench/route.sh session.
#include <benchmark/benchmark.h>

#include <malloc.h>

#include <cstdio>
#include <string>
#include <vector>

#include "proxy/session_seal.h"
#include "proxy/session_table.h"

using namespace stepflow;

namespace {

// Ids shaped like the MCP SDK's (a UUID) padded to 64 bytes, the size the issue names.
std::string session_id(size_t i) {
    char buf[80];
    std::snprintf(buf, sizeof buf, "%08zx-6b1f-4c3e-9a7d-%012zx-%027zx", i * 2654435761u % 0xffffffffu, i, i);
    return std::string(buf, 64);
}

const char* kInstance = "mcp-server-7d9f8c6b5-x2k4q";

// A 36-byte UUID, the shape of the MCP SDK's session ids.
std::string uuid(size_t i) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%08zx-6b1f-4c3e-9a7d-%012zx", i * 2654435761u % 0xffffffffu, i);
    return std::string(buf, 36);
}

// Heap bytes one remembered session costs: the allocator's count before and after filling a table
// with 36-byte ids spread over 16 instances (ids made beforehand, so only the table is counted).
void BM_SessionBytes(benchmark::State& state) {
    size_t n = size_t(state.range(0));
    std::vector<std::string> ids, instances;
    for (size_t i = 0; i < n; ++i) ids.push_back(uuid(i));
    for (int i = 0; i < 16; ++i) instances.push_back(std::string(kInstance) + "-" + std::to_string(i));
    double per_entry = 0;
    for (auto _ : state) {
        size_t before = mallinfo2().uordblks;
        auto table = std::make_unique<SessionTable>(n, std::chrono::hours(1));
        auto now = SessionTable::Clock::now();
        for (size_t i = 0; i < n; ++i) table->remember(ids[i], instances[i % 16], now);
        per_entry = double(mallinfo2().uordblks - before) / double(n);
    }
    state.counters["bytes_per_session"] = per_entry;
}
BENCHMARK(BM_SessionBytes)->Arg(100000)->Arg(1000000)->Iterations(1);

std::vector<std::string> fill(SessionTable& table, size_t n) {
    std::vector<std::string> ids;
    ids.reserve(n);
    auto now = SessionTable::Clock::now();
    for (size_t i = 0; i < n; ++i) {
        ids.push_back(session_id(i));
        table.remember(ids.back(), kInstance, now);
    }
    return ids;
}

void BM_SessionLookup(benchmark::State& state) {
    size_t n = size_t(state.range(0));
    SessionTable table(n, std::chrono::hours(1));
    auto ids = fill(table, n);
    std::string instance;
    size_t i = 0;
    for (auto _ : state) {
        bool hit = table.lookup(ids[i], instance);
        benchmark::DoNotOptimize(hit);
        i = (i + 7919) % n;  // stride over the table: not one hot entry
    }
}
BENCHMARK(BM_SessionLookup)->Arg(1000)->Arg(100000)->Arg(1000000);

// A response naming its session again (the common case: the SDK repeats the header).
void BM_SessionRemember(benchmark::State& state) {
    size_t n = size_t(state.range(0));
    SessionTable table(n, std::chrono::hours(1));
    auto ids = fill(table, n);
    size_t i = 0;
    for (auto _ : state) {
        table.remember(ids[i], kInstance);
        i = (i + 7919) % n;
    }
}
BENCHMARK(BM_SessionRemember)->Arg(1000)->Arg(100000)->Arg(1000000);

std::vector<SessionKey> bench_keys() {
    SessionKey key{};
    for (size_t i = 0; i < key.size(); ++i) key[i] = uint8_t(i * 7 + 1);
    return {key};
}

void BM_Seal(benchmark::State& state) {
    SessionSealer sealer(bench_keys());
    std::string backend = session_id(1);
    for (auto _ : state) {
        std::string sealed = sealer.seal(kInstance, backend);
        benchmark::DoNotOptimize(sealed);
    }
    state.counters["bytes"] = double(sealer.seal(kInstance, backend).size());
}
BENCHMARK(BM_Seal);

void BM_Unseal(benchmark::State& state) {
    SessionSealer sealer(bench_keys());
    std::string sealed = sealer.seal(kInstance, session_id(1));
    std::string instance, backend;
    for (auto _ : state) {
        bool ok = UnsealResult::Ok == sealer.unseal(sealed, instance, backend);
        benchmark::DoNotOptimize(ok);
    }
}
BENCHMARK(BM_Unseal);

// A forged id: the cost a flood of made-up ids puts on the balancer (it never reaches a backend).
void BM_UnsealForged(benchmark::State& state) {
    SessionSealer sealer(bench_keys());
    std::string forged = sealer.seal(kInstance, session_id(1));
    forged[forged.size() / 2] = forged[forged.size() / 2] == 'A' ? 'B' : 'A';
    std::string instance, backend;
    for (auto _ : state) {
        bool ok = UnsealResult::Ok == sealer.unseal(forged, instance, backend);
        benchmark::DoNotOptimize(ok);
    }
}
BENCHMARK(BM_UnsealForged);

}  // namespace

BENCHMARK_MAIN();
