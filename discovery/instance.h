// One worker process behind the balancer: an address plus the instanceId its /health reported.
// The record keeps its identity across fleet snapshots, so the in-flight counter that requests
// increment and decrement always lands on the same object, whatever snapshot they started under.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include <sys/socket.h>

namespace stepflow {

class BackendSeries;  // core/metrics_registry.h

// What discovery says of the endpoint. Health is kept apart (Instance::healthy) because the two
// change for different reasons and from different places.
enum class Membership : uint8_t {
    Active,    // ready endpoint: may take new work
    Draining,  // terminating but serving: finishes pinned sessions, takes no new work
    NotServing,  // neither ready nor serving: takes nothing, but may come back with its sessions
    Gone,      // left the fleet, or restarted as a new instance: takes nothing
};

const char* to_string(Membership m);

// Where an instance's limit on new work comes from (shown in /debug/backends).
enum class LimitSource : uint8_t {
    None,     // unlimited
    Flag,     // --max-in-flight-per-instance
    Health,   // the worker's /health body (maxConcurrency)
    Header,   // the worker's endpoint-load-metrics response header (named_metrics.capacity)
    Learned,  // cut by a -32300 answer, growing back
};
const char* to_string(LimitSource s);

struct Instance : std::enable_shared_from_this<Instance> {
    Instance(std::string instance_id, std::string backend_address, const sockaddr_storage& addr, socklen_t addr_len,
             std::string pod_name)
        : id(std::move(instance_id)), address(std::move(backend_address)), sockaddr(addr), sockaddr_len(addr_len),
          pod(std::move(pod_name)) {}

    const std::string id;       // instanceId from the worker's /health
    const std::string address;  // "host:port" as discovered; also the metrics `backend` label
    const sockaddr_storage sockaddr;
    const socklen_t sockaddr_len;
    const std::string pod;      // pod name from the EndpointSlice targetRef, empty when unknown

    // Request metrics of this address; set before the instance is published, then only read.
    std::shared_ptr<BackendSeries> series;

    std::atomic<Membership> membership{Membership::Active};
    std::atomic<bool> healthy{true};  // false after --max-failures failed checks or live failures
    std::atomic<int> in_flight{0};
    // Active (/health, control thread) and passive (live traffic, request threads) failures are
    // counted apart, so a stream of live successes cannot hide a /health that keeps failing.
    std::atomic<int> check_failures{0};
    std::atomic<int> live_failures{0};
    std::atomic<int> check_successes{0};  // consecutive, while unhealthy: the --health-rise count
    // --health-check off: nothing would ever bring the instance back, so failures are recorded
    // but never take it out of routing. Set before the instance is published.
    bool failures_keep_routable = false;

    // Admission (docs/admission.md). `new_work` counts this instance's unpinned requests in
    // flight, the only ones a limit applies to: pinned work (callback answers) must never wait
    // behind new work, or an execution could wait on its own slot.
    std::atomic<int> new_work{0};
    std::atomic<int> base_limit{0};     // from --max-in-flight-per-instance or the worker; 0 = none
    std::atomic<LimitSource> base_source{LimitSource::None};
    std::atomic<int> learned_limit{0};  // cut by a -32300 answer, doubled back per quiet interval
    std::atomic<int64_t> learned_at_ms{0};  // steady-clock ms of the last cut or increase
    std::atomic<int> learned_floor{0};  // what the last cut set, for when an unlimited base clears it
    // A worker that refused while we had nothing else on it (it is full of others' work, or stuck)
    // gets no new work until the cool-down ends; then one probe slot (learned_limit 1).
    std::atomic<bool> cooling{false};
    std::atomic<int64_t> cooling_until_ms{0};
    std::atomic<int> refusals{0};  // -32300 answers in a row without a success between them
    // --max-in-flight-per-instance (0: none), what a report falls back to once it goes stale.
    int flag_limit = 0;
    std::atomic<int64_t> reported_at_ms{0};  // steady-clock ms of the last report (health or header)

    // The limit in force now (0 = unlimited) and where it came from.
    int limit() const {
        int base = base_limit.load(std::memory_order_relaxed);
        int learned = learned_limit.load(std::memory_order_relaxed);
        if (learned > 0 && (base == 0 || learned < base)) return learned;
        return base;
    }
    LimitSource limit_source() const {
        int base = base_limit.load(std::memory_order_relaxed);
        int learned = learned_limit.load(std::memory_order_relaxed);
        if (learned > 0 && (base == 0 || learned < base)) return LimitSource::Learned;
        return base_source.load(std::memory_order_relaxed);
    }
    // "normal", "cooling" (no new work), "probing" (one slot) or "recovering" (growing back).
    const char* capacity_state() const {
        if (cooling.load(std::memory_order_relaxed)) return "cooling";
        if (limit_source() != LimitSource::Learned) return "normal";
        return learned_limit.load(std::memory_order_relaxed) == 1 ? "probing" : "recovering";
    }
    // Sets the limit a worker reports (health body or response header); a report of 0 or less is ignored.
    void set_reported_limit(int n, LimitSource source, int64_t now_ms = 0) {
        if (n <= 0) return;
        base_limit.store(n, std::memory_order_relaxed);
        base_source.store(source, std::memory_order_relaxed);
        if (now_ms > 0) reported_at_ms.store(now_ms, std::memory_order_relaxed);
    }
    bool has_room() const {
        if (cooling.load(std::memory_order_relaxed)) return false;
        int lim = limit();
        return lim == 0 || new_work.load(std::memory_order_relaxed) < lim;
    }
    // Takes a slot for new work unless the limit is reached.
    bool try_admit() {
        if (cooling.load(std::memory_order_relaxed)) return false;
        int cur = new_work.load(std::memory_order_relaxed);
        while (true) {
            int lim = limit();
            if (lim > 0 && cur >= lim) return false;
            if (new_work.compare_exchange_weak(cur, cur + 1, std::memory_order_relaxed)) return true;
        }
    }
    // A -32300 answer: the worker was full with `ours` of our requests on it (this one
    // included), so at most ours - 1 fit. When none fit (it is full of others' work, or stuck),
    // it gets no new work for `cooldown_ms`, then one probe slot: a stuck worker costs about one
    // request per cool-down, not a round trip for every request.
    void worker_at_capacity(int ours, int64_t now_ms, int64_t cooldown_ms) {
        int cut = ours - 1;
        int cur = limit();
        if (cur != 0 && cur <= cut) cut = cur - 1;
        refusals.fetch_add(1, std::memory_order_relaxed);
        learned_at_ms.store(now_ms, std::memory_order_relaxed);
        if (cut < 1) {
            learned_limit.store(1, std::memory_order_relaxed);  // the probe slot, once the cool-down ends
            learned_floor.store(1, std::memory_order_relaxed);
            cooling_until_ms.store(now_ms + cooldown_ms, std::memory_order_relaxed);
            cooling.store(true, std::memory_order_relaxed);
            return;
        }
        learned_limit.store(cut, std::memory_order_relaxed);
        learned_floor.store(cut, std::memory_order_relaxed);
    }
    // A response that was not a refusal.
    void worker_answered() {
        if (refusals.load(std::memory_order_relaxed) != 0) refusals.store(0, std::memory_order_relaxed);
    }
    // Called a few times a second from every thread. Ends a cool-down (the probe slot opens);
    // else doubles a learned limit per quiet `interval_ms` since the last cut or increase, and
    // drops it once it reaches the base limit (or twice what it was cut to when there is no
    // base). A worker report older than `report_ttl_ms` falls back to the flag. Returns true when
    // room grew (queued work may now fit).
    bool recover_limit(int64_t now_ms, int64_t interval_ms, int64_t report_ttl_ms = 0) {
        if (report_ttl_ms > 0) expire_report(now_ms, report_ttl_ms);
        if (cooling.load(std::memory_order_relaxed)) {
            if (now_ms < cooling_until_ms.load(std::memory_order_relaxed)) return false;
            bool was = true;
            if (!cooling.compare_exchange_strong(was, false, std::memory_order_relaxed)) return false;
            learned_at_ms.store(now_ms, std::memory_order_relaxed);
            return true;
        }
        int learned = learned_limit.load(std::memory_order_relaxed);
        if (learned == 0) return false;
        int64_t at = learned_at_ms.load(std::memory_order_relaxed);
        if (now_ms - at < interval_ms) return false;
        if (!learned_at_ms.compare_exchange_strong(at, now_ms, std::memory_order_relaxed)) return false;
        int base = base_limit.load(std::memory_order_relaxed);
        int next = learned * 2;
        int ceiling = base > 0 ? base : 2 * learned_floor.load(std::memory_order_relaxed) + 1;
        learned_limit.compare_exchange_strong(learned, next >= ceiling ? 0 : next, std::memory_order_relaxed);
        return true;
    }
    // A worker that stopped reporting its capacity: back to --max-in-flight-per-instance.
    void expire_report(int64_t now_ms, int64_t ttl_ms) {
        LimitSource src = base_source.load(std::memory_order_relaxed);
        if (src != LimitSource::Health && src != LimitSource::Header) return;
        int64_t at = reported_at_ms.load(std::memory_order_relaxed);
        if (at == 0 || now_ms - at < ttl_ms) return;
        base_limit.store(flag_limit, std::memory_order_relaxed);
        base_source.store(flag_limit > 0 ? LimitSource::Flag : LimitSource::None, std::memory_order_relaxed);
    }

    bool takes_new_work() const {
        return healthy.load(std::memory_order_relaxed) &&
               membership.load(std::memory_order_relaxed) == Membership::Active;
    }
    bool takes_pinned_work() const {
        auto m = membership.load(std::memory_order_relaxed);
        return healthy.load(std::memory_order_relaxed) && (m == Membership::Active || m == Membership::Draining);
    }
    // "healthy", "unhealthy", "draining" or "gone": for /debug/backends and logs.
    const char* state_name() const;

    // Counts a failure seen on live traffic (connect refused, reset). Returns true when this
    // failure crossed the threshold and turned the instance unhealthy.
    bool record_failure(int max_failures, const std::string& why);
    // A live response: clears the live failure count only. It never brings an unhealthy instance
    // back, nor erases failed /health checks.
    void record_success() { live_failures.store(0, std::memory_order_relaxed); }
    // Results of active /health checks (control thread). A failed check returns true when it
    // turned the instance unhealthy; a passed one returns true when it made it healthy again,
    // which takes `rise` passed checks in a row once it was unhealthy.
    bool record_check_failure(int max_failures, const std::string& why);
    bool record_check_success(int rise);
    int consecutive_failures() const {
        return std::max(check_failures.load(std::memory_order_relaxed), live_failures.load(std::memory_order_relaxed));
    }

    std::string last_error() const;
    void set_last_error(const std::string& why);

private:
    mutable std::mutex last_error_mutex_;  // debug-only field; never touched on the hot path
    std::string last_error_;
};

using InstancePtr = std::shared_ptr<Instance>;

}  // namespace stepflow
