#include "discovery/instance.h"

namespace stepflow {

const char* to_string(Membership m) {
    switch (m) {
    case Membership::Active: return "active";
    case Membership::Draining: return "draining";
    case Membership::NotServing: return "not-serving";
    case Membership::Gone: return "gone";
    }
    return "unknown";
}

const char* Instance::state_name() const {
    auto m = membership.load(std::memory_order_relaxed);
    if (m != Membership::Active) return to_string(m);
    return healthy.load(std::memory_order_relaxed) ? "healthy" : "unhealthy";
}

bool Instance::record_failure(int max_failures, const std::string& why) {
    set_last_error(why);
    if (failures_keep_routable) return false;
    int n = live_failures.fetch_add(1, std::memory_order_relaxed) + 1;
    if (n >= max_failures) return healthy.exchange(false, std::memory_order_relaxed);
    return false;
}

bool Instance::record_check_failure(int max_failures, const std::string& why) {
    set_last_error(why);
    check_successes.store(0, std::memory_order_relaxed);
    int n = check_failures.fetch_add(1, std::memory_order_relaxed) + 1;
    if (n >= max_failures) return healthy.exchange(false, std::memory_order_relaxed);
    return false;
}

bool Instance::record_check_success(int rise) {
    check_failures.store(0, std::memory_order_relaxed);
    if (healthy.load(std::memory_order_relaxed)) return false;
    if (check_successes.fetch_add(1, std::memory_order_relaxed) + 1 < rise) return false;
    // Back in: live failures that took it out are history now.
    check_successes.store(0, std::memory_order_relaxed);
    live_failures.store(0, std::memory_order_relaxed);
    return !healthy.exchange(true, std::memory_order_relaxed);
}

std::string Instance::last_error() const {
    std::lock_guard lock(last_error_mutex_);
    return last_error_;
}

void Instance::set_last_error(const std::string& why) {
    std::lock_guard lock(last_error_mutex_);
    last_error_ = why;
}

}  // namespace stepflow
