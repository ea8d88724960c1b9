// Series that one thread updates and scrapes read. An update is a load and a store on a relaxed
// atomic (there is a single writer), where prometheus-cpp's counters take a compare-and-swap loop
// and its histograms a mutex per update. At each scrape publish() adds what a cell gained since
// the scrape before to its prometheus series, so the exposition is what it would have been.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/histogram.h>

namespace stepflow {

class LocalCounter {
public:
    void add(uint64_t n = 1) { value_.store(value_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed); }
    // Scrape side; calls for one cell are serialized by its owner.
    void publish(prometheus::Counter& to);

private:
    std::atomic<uint64_t> value_{0};
    uint64_t published_ = 0;
};

class LocalHistogram {
public:
    // `bounds` (upper bounds, ascending, as the prometheus series was made with) outlive the cell.
    explicit LocalHistogram(const std::vector<double>& bounds);
    void observe(double value);
    bool observed() const;  // anything, ever
    void publish(prometheus::Histogram& to);

private:
    const std::vector<double>& bounds_;
    std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // one per bound, then +Inf
    std::atomic<double> sum_{0};
    std::vector<uint64_t> published_;
    double published_sum_ = 0;
};

}  // namespace stepflow
