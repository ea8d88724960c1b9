// The routing decision: pinned requests go to the instance they name, new work to the least
// loaded instance that takes it. Pure functions of the fleet snapshot; no locks, no allocation.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "discovery/fleet.h"
#include "proxy/metrics.h"

namespace stepflow {

// Up to this many instances the least-load choice scans them all; beyond it, it takes the less
// loaded of two random candidates (power of two choices), which keeps the decision O(1).
constexpr size_t kExactLeastLoadLimit = 64;

// Small, fast, per-thread random numbers for tie-breaking (xorshift64*).
class Rng {
public:
    explicit Rng(uint64_t seed) : state_(seed ? seed : 0x9e3779b97f4a7c15ull) {}
    uint64_t next() {
        state_ ^= state_ >> 12;
        state_ ^= state_ << 25;
        state_ ^= state_ >> 27;
        return state_ * 0x2545f4914f6cdd1dull;
    }
    // Uniform in [0, n) for n < 2^32, by multiply-shift rather than a 64-bit division.
    size_t below(size_t n) { return size_t(((next() >> 32) * uint64_t(n)) >> 32); }

private:
    uint64_t state_;
};

// Instance that takes pinned work under `id`, or nullptr with `why` set.
Instance* route_pinned(const Fleet& fleet, std::string_view id, PinnedMiss& why);

// Least-loaded instance taking new work, never one in `tried`; nullptr when none is left.
// Calling again with the previous answers in `tried` yields the next fallback. With `need_room`
// only instances below their limit on new work count (InstanceCapacity::has_room).
Instance* route_least_load(const Fleet& fleet, Rng& rng, std::span<Instance* const> tried = {},
                           bool need_room = false);

}  // namespace stepflow
