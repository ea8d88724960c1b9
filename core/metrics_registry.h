// The process's one Prometheus registry, and the request series of each backend address: discovery
// creates them with an instance (discovery/fleet_manager.cpp) and the data path observes them as
// requests end. The data path's families (proxy/metrics.h) and discovery's
// (discovery/discovery_metrics.h) register here too; the exposition lists families by type, then
// in the order they were registered.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "core/local_series.h"

namespace stepflow {

class BackendSeries;

// HTTP methods we label by; anything else is "OTHER" so clients cannot mint series.
uint8_t method_index(std::string_view method);
const char* method_label(uint8_t index);
constexpr uint8_t kMethodLabels = 8;

// Buckets of stepflow_lb_request_duration_ms.
const prometheus::Histogram::BucketBoundaries& ms_buckets();

class MetricsRegistry {
public:
    static MetricsRegistry& get();

    prometheus::Registry& registry() { return *registry_; }
    // Without compatible metrics the millisecond histogram is not exported (promtool objects to
    // the unit in its name); stepflow_lb_request_duration_seconds carries the same data.
    void set_compat_metrics(bool on);
    bool compat_metrics() const { return compat_metrics_; }
    // How many request threads count into backend series (their slots), set before discovery
    // creates any.
    void set_request_threads(int n) { request_threads_.store(n, std::memory_order_relaxed); }
    int request_threads() const { return request_threads_.load(std::memory_order_relaxed); }

    prometheus::Family<prometheus::Counter>& requests_total;
    prometheus::Family<prometheus::Histogram>& request_duration_ms;

    // The request series of a backend address, shared by every instance at that address (control
    // thread, when an instance is created). retire_backend() removes them from the registry when
    // the address leaves discovery, so the number of series follows the fleet, not its history.
    std::shared_ptr<BackendSeries> backend_series(const std::string& address);
    void retire_backend(const std::string& address);
    // Adds what the request threads counted per backend since the last call (each scrape).
    void publish_backends();

private:
    explicit MetricsRegistry(std::shared_ptr<prometheus::Registry> registry);
    std::shared_ptr<prometheus::Registry> registry_;
    bool compat_metrics_ = true;
    std::atomic<int> request_threads_{256};  // --threads at most
    std::mutex request_series_mutex_;
    std::map<std::string, std::weak_ptr<BackendSeries>> request_series_;  // by address
};

// requests_total and request_duration_ms of one backend address. Request threads reach it through
// the Instance that served them and count in cells of their own (core/local_series.h), without
// a lock once a (status, method) has been seen; each scrape publishes the cells into the
// registry's series. Once retired its series are out of the registry and observing does
// nothing, so no thread ever touches a removed series. A request that ends after its backend
// left discovery is counted only in the unlabelled-by-backend metrics.
class BackendSeries {
public:
    explicit BackendSeries(std::string address);
    ~BackendSeries();
    BackendSeries(const BackendSeries&) = delete;
    BackendSeries& operator=(const BackendSeries&) = delete;

    // From request thread `thread` (its index, below MetricsRegistry::request_threads()) only.
    void observe(int thread, int status, uint8_t method_index, double duration_ms);
    void publish();
    void retire();

private:
    // One request thread's cells. Only that thread adds entries (under mutex_, which scrapes hold
    // while reading them) and it looks them up without the lock.
    struct ThreadCells {
        std::unordered_map<uint32_t, LocalCounter> requests;  // key: status * 16 + method index
        std::array<std::unique_ptr<LocalHistogram>, kMethodLabels> durations;
    };
    std::mutex mutex_;
    std::atomic<bool> retired_{false};
    const std::string address_;
    std::vector<std::unique_ptr<ThreadCells>> cells_;  // by thread index
    std::unordered_map<uint32_t, prometheus::Counter*> requests_;  // the registry's, made when first published
    std::array<prometheus::Histogram*, kMethodLabels> durations_{};
};

}  // namespace stepflow
