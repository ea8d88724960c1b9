// How much new work one instance may take: its limit, where the limit came from, and the slots in
// use. Three sources change the limit (the worker's /health report, its endpoint-load-metrics
// response header, its -32300 answers) and the admission tick grows a cut limit back; each change
// is one transaction under one lock. The request path (take a slot, give it back, ask for room)
// never takes the lock: the slots in use and the limit in force share one atomic word, so a slot is
// taken with one compare-and-swap against the limit that was in force at that instant.
// The rules are in docs/admission.md.
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <mutex>

namespace stepflow {

// Where an instance's limit on new work comes from (shown in /debug/backends).
enum class LimitSource : uint8_t {
    None,     // unlimited
    Flag,     // --max-in-flight-per-instance
    Health,   // the worker's /health body (maxConcurrency)
    Header,   // the worker's endpoint-load-metrics response header (named_metrics.capacity)
    Learned,  // cut by a -32300 answer, growing back
};
const char* to_string(LimitSource s);

class InstanceCapacity {
public:
    static constexpr int kUnlimited = INT_MAX;  // free_slots() of an instance without a limit

    // --- The request path: lock-free.

    // Takes a slot for new work unless the limit is reached or the instance is cooling down.
    bool try_take() {
        uint64_t w = word_.load(std::memory_order_relaxed);
        do {
            if (!fits(w)) return false;
        } while (!word_.compare_exchange_weak(w, w + 1, std::memory_order_relaxed));
        return true;
    }
    // Gives back a slot taken by try_take().
    void release() { word_.fetch_sub(1, std::memory_order_relaxed); }
    bool has_room() const { return fits(word_.load(std::memory_order_relaxed)); }
    int in_use() const { return int(uint32_t(word_.load(std::memory_order_relaxed))); }
    // The limit in force (0 = unlimited); during a cool-down, the probe slot that follows it.
    int limit() const { return limit_of(word_.load(std::memory_order_relaxed)); }
    bool cooling() const { return word_.load(std::memory_order_relaxed) & kClosed; }
    // Slots left now: 0 while cooling, kUnlimited without a limit.
    int free_slots() const {
        uint64_t w = word_.load(std::memory_order_relaxed);
        if (w & kClosed) return 0;
        int lim = limit_of(w), used = int(uint32_t(w));
        return lim == 0 ? kUnlimited : (used < lim ? lim - used : 0);
    }

    // --- The sources: one transaction each.

    // --max-in-flight-per-instance (0: none): the limit until the worker reports one, and what a
    // report falls back to once it goes stale. Set before the instance is published.
    void set_flag(int n);
    // The limit a worker reports (health body or response header); 0 or less is not a report.
    void report(int n, LimitSource source, int64_t now_ms = 0);
    // A -32300 answer to one of the slots in use (not yet released): the worker was full with our
    // slots in use, this one included, so at most that many minus one fit. When none fit (it is
    // full of others' work, or stuck), it gets no new work for `cooldown_ms`, then one probe slot:
    // a stuck worker costs about one request per cool-down, not a round trip for every request.
    void refused(int64_t now_ms, int64_t cooldown_ms);
    // A response that was not a refusal. Lock-free unless it ends a run of refusals.
    void answered() {
        if (refusals_.load(std::memory_order_relaxed) != 0) clear_refusals();
    }
    // The admission tick (a few times a second, from every thread). Ends a cool-down (the probe
    // slot opens); else doubles a learned limit per quiet `interval_ms` since the last cut or
    // increase, and drops it once it reaches the base limit (or twice what it was cut to when there
    // is no base). A worker report older than `report_ttl_ms` falls back to the flag. True when
    // room grew (queued work may now fit).
    bool tick(int64_t now_ms, int64_t interval_ms, int64_t report_ttl_ms = 0);

    // --- What /debug/backends and the tests read.

    // -32300 answers in a row without another answer between them.
    int refusals() const { return refusals_.load(std::memory_order_relaxed); }
    struct View {
        int in_use;
        int limit;
        LimitSource source;
        const char* state;   // "normal", "cooling" (no new work), "probing" (one slot), "recovering"
        int64_t cooling_ms;  // left of the cool-down
        int refusals;
        int flag_limit;
    };
    View view(int64_t now_ms) const;
    LimitSource source() const { return view(0).source; }
    const char* state() const { return view(0).state; }

private:
    // The word: slots in use in the low 32 bits, the limit in force above them, and the top bit
    // set while cooling down. Only the lock holder changes the upper half; release() and
    // try_take() only move the count, which never goes below zero, so they never disturb it.
    static constexpr uint64_t kClosed = uint64_t(1) << 63;
    static int limit_of(uint64_t w) { return int((w >> 32) & 0x7fffffff); }
    static bool fits(uint64_t w) {
        if (w & kClosed) return false;
        int lim = limit_of(w);
        return lim == 0 || int(uint32_t(w)) < lim;
    }

    int limit_locked() const;  // the smaller of the base and the learned limit (0 = none)
    LimitSource source_locked() const;
    void publish_locked();     // writes the limit in force and the cool-down into the word
    void expire_locked(int64_t now_ms, int64_t ttl_ms);
    void clear_refusals();

    std::atomic<uint64_t> word_{0};
    std::atomic<int> refusals_{0};  // written under the lock; read without it by answered()

    mutable std::mutex mutex_;  // guards everything below; never taken to take or release a slot
    int flag_ = 0;
    int base_ = 0;  // from the flag or the worker; 0 = none
    LimitSource base_source_ = LimitSource::None;
    int64_t reported_at_ms_ = 0;  // steady-clock ms of the last report (health or header)
    int learned_ = 0;             // cut by a -32300 answer, doubled back per quiet interval
    int learned_floor_ = 0;       // what the last cut set, for when an unlimited base clears it
    int64_t learned_at_ms_ = 0;   // the last cut or increase
    bool cooling_ = false;
    int64_t cooling_until_ms_ = 0;
};

}  // namespace stepflow
