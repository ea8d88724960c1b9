// The fleet snapshot: which instances exist right now. Discovery builds a new one on every change
// and publishes it; request threads read it without locks (see FleetPublisher).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "discovery/instance.h"

namespace stepflow {

struct Fleet {
    uint64_t version = 0;
    std::vector<InstancePtr> instances;                      // every known instance, any state
    std::unordered_map<std::string_view, Instance*> by_id;  // keys view Instance::id

    Instance* find(std::string_view id) const {
        auto it = by_id.find(id);
        return it == by_id.end() ? nullptr : it->second;
    }
};

using FleetPtr = std::shared_ptr<const Fleet>;

FleetPtr make_fleet(uint64_t version, std::vector<InstancePtr> instances);

// Publishes snapshots from the control thread to the request threads. A reader keeps its own
// FleetPtr and compares one atomic generation number per request; only when that moved does it
// take the mutex to fetch the new snapshot, so the steady-state request path takes no lock.
class FleetPublisher {
public:
    FleetPublisher() : current_(make_fleet(0, {})) {}

    void publish(FleetPtr fleet) {
        {
            std::lock_guard lock(mutex_);
            current_ = std::move(fleet);
        }
        generation_.fetch_add(1, std::memory_order_release);
    }

    FleetPtr current() const {
        std::lock_guard lock(mutex_);
        return current_;
    }

    uint64_t generation() const { return generation_.load(std::memory_order_acquire); }

private:
    mutable std::mutex mutex_;
    FleetPtr current_;
    std::atomic<uint64_t> generation_{1};
};

// A request thread's view of the fleet: refreshes itself when the publisher's generation moves.
class FleetView {
public:
    explicit FleetView(const FleetPublisher& publisher) : publisher_(publisher) {}

    const Fleet& get() {
        uint64_t gen = publisher_.generation();
        if (gen != seen_generation_) {
            fleet_ = publisher_.current();
            seen_generation_ = gen;
        }
        return *fleet_;
    }

private:
    const FleetPublisher& publisher_;
    FleetPtr fleet_;
    uint64_t seen_generation_ = 0;
};

}  // namespace stepflow
