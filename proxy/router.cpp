#include "proxy/router.h"

#include <algorithm>
#include <climits>

namespace stepflow {
namespace {

bool was_tried(const Instance* inst, std::span<Instance* const> tried) {
    return std::find(tried.begin(), tried.end(), inst) != tried.end();
}

bool eligible(const Instance* inst, std::span<Instance* const> tried, bool need_room) {
    return inst->takes_new_work() && !was_tried(inst, tried) && (!need_room || inst->capacity.has_room());
}

int load_of(const Instance* inst) { return inst->in_flight.load(std::memory_order_relaxed); }

Instance* exact_least_load(const Fleet& fleet, Rng& rng, std::span<Instance* const> tried, bool need_room) {
    Instance* best = nullptr;
    int best_load = INT_MAX;
    size_t ties = 0;
    for (const auto& ptr : fleet.instances) {
        Instance* inst = ptr.get();
        if (!eligible(inst, tried, need_room)) continue;
        int load = load_of(inst);
        if (load < best_load) {
            best = inst;
            best_load = load;
            ties = 1;
        } else if (load == best_load && rng.below(++ties) == 0) {
            best = inst;  // reservoir sampling: each tied instance is chosen with equal chance
        }
    }
    return best;
}

Instance* sampled_least_load(const Fleet& fleet, Rng& rng, std::span<Instance* const> tried, bool need_room) {
    const size_t n = fleet.instances.size();
    Instance* pick[2] = {nullptr, nullptr};
    // Random probes find two eligible candidates at once while most of the fleet takes new work,
    // and 64 probes still find them 99 times in 100 when only a tenth does; otherwise fall back to
    // the exact scan so an eligible instance is never missed.
    for (int probe = 0, found = 0; probe < 64 && found < 2; ++probe) {
        Instance* inst = fleet.instances[rng.below(n)].get();
        if (eligible(inst, tried, need_room) && inst != pick[0]) pick[found++] = inst;
    }
    if (!pick[0] || !pick[1]) return exact_least_load(fleet, rng, tried, need_room);
    return load_of(pick[1]) < load_of(pick[0]) ? pick[1] : pick[0];
}

}  // namespace

Instance* route_pinned(const Fleet& fleet, std::string_view id, PinnedMiss& why) {
    Instance* inst = fleet.find(id);
    if (!inst) {
        why = PinnedMiss::UnknownInstance;
        return nullptr;
    }
    if (!inst->takes_pinned_work()) {
        why = PinnedMiss::NotServing;
        return nullptr;
    }
    return inst;
}

Instance* route_least_load(const Fleet& fleet, Rng& rng, std::span<Instance* const> tried, bool need_room) {
    if (fleet.instances.size() <= kExactLeastLoadLimit) return exact_least_load(fleet, rng, tried, need_room);
    return sampled_least_load(fleet, rng, tried, need_room);
}

}  // namespace stepflow
