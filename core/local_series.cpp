#include "core/local_series.h"

#include <algorithm>

namespace stepflow {

void LocalCounter::publish(prometheus::Counter& to) {
    uint64_t now = value_.load(std::memory_order_relaxed);
    if (now == published_) return;
    to.Increment(double(now - published_));
    published_ = now;
}

LocalHistogram::LocalHistogram(const std::vector<double>& bounds)
    : bounds_(bounds), counts_(new std::atomic<uint64_t>[bounds.size() + 1]), published_(bounds.size() + 1, 0) {
    for (size_t i = 0; i <= bounds.size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

// The bucket prometheus-cpp's Histogram::Observe picks: the first bound at or above the value.
void LocalHistogram::observe(double value) {
    size_t i = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
    sum_.store(sum_.load(std::memory_order_relaxed) + value, std::memory_order_relaxed);
    counts_[i].store(counts_[i].load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

bool LocalHistogram::observed() const {
    for (size_t i = 0; i <= bounds_.size(); ++i)
        if (counts_[i].load(std::memory_order_relaxed) != 0) return true;
    return false;
}

void LocalHistogram::publish(prometheus::Histogram& to) {
    std::vector<double> gained(bounds_.size() + 1);
    bool any = false;
    for (size_t i = 0; i <= bounds_.size(); ++i) {
        uint64_t now = counts_[i].load(std::memory_order_relaxed);
        gained[i] = double(now - published_[i]);
        any |= now != published_[i];
        published_[i] = now;
    }
    double sum = sum_.load(std::memory_order_relaxed);
    if (!any) return;
    to.ObserveMultiple(gained, sum - published_sum_);
    published_sum_ = sum;
}

}  // namespace stepflow
