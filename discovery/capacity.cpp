#include "discovery/capacity.h"

#include <algorithm>

namespace stepflow {

const char* to_string(LimitSource s) {
    switch (s) {
    case LimitSource::None: return "none";
    case LimitSource::Flag: return "flag";
    case LimitSource::Health: return "health";
    case LimitSource::Header: return "header";
    case LimitSource::Learned: return "learned";
    }
    return "unknown";
}

int InstanceCapacity::limit_locked() const {
    if (learned_ > 0 && (base_ == 0 || learned_ < base_)) return learned_;
    return base_;
}

LimitSource InstanceCapacity::source_locked() const {
    if (learned_ > 0 && (base_ == 0 || learned_ < base_)) return LimitSource::Learned;
    return base_source_;
}

void InstanceCapacity::publish_locked() {
    uint64_t upper = uint64_t(std::min(limit_locked(), 0x7fffffff)) << 32;
    if (cooling_) upper |= kClosed;
    uint64_t w = word_.load(std::memory_order_relaxed);
    while (!word_.compare_exchange_weak(w, (w & 0xffffffffu) | upper, std::memory_order_relaxed)) {
    }
}

void InstanceCapacity::set_flag(int n) {
    std::lock_guard lock(mutex_);
    flag_ = std::max(0, n);
    if (flag_ > 0) {
        base_ = flag_;
        base_source_ = LimitSource::Flag;
    }
    publish_locked();
}

void InstanceCapacity::report(int n, LimitSource source, int64_t now_ms) {
    if (n <= 0) return;
    std::lock_guard lock(mutex_);
    if (now_ms > 0) reported_at_ms_ = now_ms;
    if (base_ == n && base_source_ == source) return;  // the usual case: nothing changes
    base_ = n;
    base_source_ = source;
    publish_locked();
}

void InstanceCapacity::refused(int64_t now_ms, int64_t cooldown_ms) {
    std::lock_guard lock(mutex_);
    int ours = in_use();
    int cut = ours - 1;
    int cur = limit_locked();
    if (cur != 0 && cur <= cut) cut = cur - 1;
    refusals_.store(refusals_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    learned_at_ms_ = now_ms;
    if (cut < 1) {
        learned_ = 1;  // the probe slot, once the cool-down ends
        learned_floor_ = 1;
        cooling_until_ms_ = now_ms + cooldown_ms;
        cooling_ = true;
    } else {
        learned_ = cut;
        learned_floor_ = cut;
    }
    publish_locked();
}

void InstanceCapacity::clear_refusals() {
    std::lock_guard lock(mutex_);
    refusals_.store(0, std::memory_order_relaxed);
}

bool InstanceCapacity::tick(int64_t now_ms, int64_t interval_ms, int64_t report_ttl_ms) {
    std::lock_guard lock(mutex_);
    int before = limit_locked();
    if (report_ttl_ms > 0) expire_locked(now_ms, report_ttl_ms);
    bool grew = false;
    if (cooling_) {
        if (now_ms >= cooling_until_ms_) {
            cooling_ = false;
            learned_at_ms_ = now_ms;
            grew = true;
        }
    } else if (learned_ > 0 && now_ms - learned_at_ms_ >= interval_ms) {
        learned_at_ms_ = now_ms;
        int next = learned_ * 2;
        int ceiling = base_ > 0 ? base_ : 2 * learned_floor_ + 1;
        learned_ = next >= ceiling ? 0 : next;
        grew = true;
    }
    if (grew || limit_locked() != before) publish_locked();
    return grew;
}

// A worker that stopped reporting its capacity: back to --max-in-flight-per-instance.
void InstanceCapacity::expire_locked(int64_t now_ms, int64_t ttl_ms) {
    if (base_source_ != LimitSource::Health && base_source_ != LimitSource::Header) return;
    if (reported_at_ms_ == 0 || now_ms - reported_at_ms_ < ttl_ms) return;
    base_ = flag_;
    base_source_ = flag_ > 0 ? LimitSource::Flag : LimitSource::None;
}

InstanceCapacity::View InstanceCapacity::view(int64_t now_ms) const {
    std::lock_guard lock(mutex_);
    View v{};
    v.in_use = in_use();
    v.limit = limit_locked();
    v.source = source_locked();
    v.refusals = refusals_.load(std::memory_order_relaxed);
    v.flag_limit = flag_;
    v.cooling_ms = cooling_ && now_ms > 0 ? std::max<int64_t>(0, cooling_until_ms_ - now_ms) : 0;
    if (cooling_) v.state = "cooling";
    else if (v.source != LimitSource::Learned) v.state = "normal";
    else v.state = learned_ == 1 ? "probing" : "recovering";
    return v;
}

}  // namespace stepflow
