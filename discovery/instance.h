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

#include "discovery/capacity.h"

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

    // Admission (docs/admission.md): the slots of this instance's unpinned requests in flight,
    // the only ones a limit applies to (pinned work, callback answers, must never wait behind new
    // work, or an execution could wait on its own slot), and the limit they are held to.
    InstanceCapacity capacity;

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
