#include "core/metrics_registry.h"

#include <algorithm>

namespace stepflow {

static constexpr const char* kMethods[kMethodLabels] = {"POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "OTHER"};

uint8_t method_index(std::string_view method) {
    for (uint8_t i = 0; i + 1 < kMethodLabels; ++i)
        if (method == kMethods[i]) return i;
    return kMethodLabels - 1;
}

const char* method_label(uint8_t index) { return kMethods[index < kMethodLabels ? index : kMethodLabels - 1]; }

const prometheus::Histogram::BucketBoundaries& ms_buckets() {
    static const prometheus::Histogram::BucketBoundaries b{1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000};
    return b;
}

MetricsRegistry& MetricsRegistry::get() {
    static MetricsRegistry* registry = new MetricsRegistry(std::make_shared<prometheus::Registry>());
    return *registry;
}

MetricsRegistry::MetricsRegistry(std::shared_ptr<prometheus::Registry> r)
    : requests_total(prometheus::BuildCounter().Name("stepflow_lb_requests_total")
                         .Help("Requests answered, by backend address, HTTP status and method").Register(*r)),
      request_duration_ms(prometheus::BuildHistogram().Name("stepflow_lb_request_duration_ms")
                              .Help("Request duration in milliseconds (compatible name), by backend and method")
                              .Register(*r)),
      registry_(std::move(r)) {}

void MetricsRegistry::set_compat_metrics(bool on) {
    if (compat_metrics_ && !on) registry_->Remove(request_duration_ms);
    compat_metrics_ = on;
}

std::shared_ptr<BackendSeries> MetricsRegistry::backend_series(const std::string& address) {
    std::lock_guard lock(request_series_mutex_);
    auto& slot = request_series_[address];
    if (auto live = slot.lock()) return live;
    auto fresh = std::make_shared<BackendSeries>(address);
    slot = fresh;
    return fresh;
}

void MetricsRegistry::retire_backend(const std::string& address) {
    std::shared_ptr<BackendSeries> series;
    {
        std::lock_guard lock(request_series_mutex_);
        auto it = request_series_.find(address);
        if (it == request_series_.end()) return;
        series = it->second.lock();
        request_series_.erase(it);
    }
    if (series) series->retire();
}

void MetricsRegistry::publish_backends() {
    std::vector<std::shared_ptr<BackendSeries>> live;
    {
        std::lock_guard lock(request_series_mutex_);
        live.reserve(request_series_.size());
        for (auto& [_, weak] : request_series_)
            if (auto s = weak.lock()) live.push_back(std::move(s));
    }
    for (auto& s : live) s->publish();
}

BackendSeries::BackendSeries(std::string address)
    : address_(std::move(address)), cells_(size_t(std::max(1, MetricsRegistry::get().request_threads()))) {}

BackendSeries::~BackendSeries() { retire(); }

void BackendSeries::observe(int thread, int status, uint8_t mi, double duration_ms) {
    if (retired_.load(std::memory_order_relaxed) || thread < 0 || size_t(thread) >= cells_.size()) return;
    auto& m = MetricsRegistry::get();
    ThreadCells* cells = cells_[size_t(thread)].get();
    if (!cells) {
        std::lock_guard lock(mutex_);
        cells_[size_t(thread)] = std::make_unique<ThreadCells>();
        cells = cells_[size_t(thread)].get();
    }
    uint32_t key = uint32_t(status) * 16 + mi;
    auto it = cells->requests.find(key);
    if (it == cells->requests.end()) {
        std::lock_guard lock(mutex_);
        it = cells->requests.try_emplace(key).first;
    }
    it->second.add();
    if (m.compat_metrics()) {
        auto& hist = cells->durations[mi];
        if (!hist) {
            std::lock_guard lock(mutex_);
            hist = std::make_unique<LocalHistogram>(ms_buckets());
        }
        hist->observe(duration_ms);
    }
}

void BackendSeries::publish() {
    auto& m = MetricsRegistry::get();
    std::lock_guard lock(mutex_);
    if (retired_.load(std::memory_order_relaxed)) return;
    for (auto& cells : cells_) {
        if (!cells) continue;
        for (auto& [key, cell] : cells->requests) {
            auto it = requests_.find(key);
            if (it == requests_.end()) {
                int status = int(key / 16);
                uint8_t mi = uint8_t(key % 16);
                it = requests_.emplace(key, &m.requests_total.Add({{"backend", address_},
                                                                   {"status", std::to_string(status)},
                                                                   {"method", method_label(mi)}})).first;
            }
            cell.publish(*it->second);
        }
        if (!m.compat_metrics()) continue;
        for (size_t mi = 0; mi < kMethodLabels; ++mi) {
            auto& cell = cells->durations[mi];
            if (!cell || !cell->observed()) continue;
            auto& hist = durations_[mi];
            if (!hist)
                hist = &m.request_duration_ms.Add({{"backend", address_}, {"method", method_label(uint8_t(mi))}},
                                                  ms_buckets());
            cell->publish(*hist);
        }
    }
}

void BackendSeries::retire() {
    auto& m = MetricsRegistry::get();
    std::lock_guard lock(mutex_);
    if (retired_.load(std::memory_order_relaxed)) return;
    retired_.store(true, std::memory_order_relaxed);
    for (auto& [_, counter] : requests_) m.requests_total.Remove(counter);
    requests_.clear();
    if (m.compat_metrics())
        for (auto* hist : durations_)
            if (hist) m.request_duration_ms.Remove(hist);
    durations_ = {};
}

}  // namespace stepflow
