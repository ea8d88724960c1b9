// The data path's metrics, in the process registry (core/metrics_registry.h). Families are created
// once; request threads keep pointers to the series they touch (label sets never come from clients).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "core/local_series.h"
#include "core/metrics_registry.h"

namespace stepflow {

struct Fleet;

// How a request was routed. The two pins are told apart in code and spans; users see both as
// "pinned" (metric labels, access log).
enum class Decision : uint8_t { PinnedByHeader, PinnedBySession, LeastLoad, None, Count };
constexpr bool is_pinned(Decision d) { return d == Decision::PinnedByHeader || d == Decision::PinnedBySession; }
const char* to_string(Decision d);

// Reasons a pinned request could not reach its instance (label values of pinned_misses_total).
enum class PinnedMiss : uint8_t { UnknownInstance, NotServing, ConnectFailed, Count };

class Metrics {
public:
    static Metrics& get();

    prometheus::Registry& registry() { return MetricsRegistry::get().registry(); }
    // Refreshes the gauges that mirror fleet state, then renders the text exposition.
    std::string render(const Fleet& fleet, size_t backends_known);

    // Families (public so the few places that add series can reach them).
    prometheus::Family<prometheus::Histogram>& request_duration_seconds;
    prometheus::Family<prometheus::Gauge>& active_connections;
    prometheus::Family<prometheus::Gauge>& instance_in_flight;
    prometheus::Family<prometheus::Gauge>& backend_health;
    prometheus::Gauge& backend_pool_size;
    prometheus::Gauge& backends_known;

    std::array<prometheus::Counter*, size_t(Decision::Count)> routing_decisions{};
    std::array<prometheus::Counter*, size_t(PinnedMiss::Count)> pinned_misses{};
    prometheus::Counter& no_healthy_instance;
    prometheus::Counter& rejected_requests;  // malformed requests answered without an upstream
    prometheus::Counter& upstream_connect_errors;
    prometheus::Counter& upstream_retries;
    prometheus::Counter& upstream_bad_responses;  // heads refused: 502, instance charged
    std::array<prometheus::Counter*, 6> upstream_responses{};  // index = status / 100 (0: none)
    // Admission (docs/admission.md)
    prometheus::Gauge& queue_depth;
    prometheus::Histogram& queue_wait_seconds;
    std::array<prometheus::Counter*, 2> queue_rejections{};  // [0] queue-full, [1] queue-timeout
    std::array<prometheus::Counter*, 32> retries_by_reason{};  // index: Failure (room for new kinds)
    prometheus::Counter& worker_at_capacity;
    prometheus::Counter& may_have_run;  // answered 502: not retried, the call may have run
    prometheus::Counter& upstream_idle_closed;  // pooled connections found closed when about to be reused
    prometheus::Family<prometheus::Gauge>& instance_limit;
    prometheus::Gauge& sse_streams_open;
    prometheus::Counter& sse_streams_total;
    prometheus::Counter& client_received_bytes;
    prometheus::Counter& client_sent_bytes;
    prometheus::Gauge& client_connections;
    prometheus::Counter& connections_refused;  // closed at accept: --max-connections reached
    prometheus::Counter& accept_pauses;        // accepting paused: no descriptor or memory left
    prometheus::Counter& log_lines_dropped;  // brought up to log::dropped_lines() on render
    // Tracing (docs/tracing.md)
    prometheus::Counter& trace_spans_exported;
    prometheus::Counter& trace_spans_queue_dropped;   // brought up to trace::Queue::dropped() on render
    prometheus::Counter& trace_spans_export_dropped;  // given up after the export's retries
    prometheus::Counter& trace_spans_rejected;        // refused by the collector in a partial success
    prometheus::Counter& trace_export_failures;

private:
    explicit Metrics(prometheus::Registry& registry);
    std::mutex fleet_series_mutex_;
    struct InstanceSeries {
        prometheus::Gauge* health;
        prometheus::Gauge* in_flight;
        prometheus::Gauge* limit;
    };
    std::map<std::string, InstanceSeries> instance_series_;  // key id
    std::map<std::string, prometheus::Gauge*> backend_series_;
};

// A request thread's series. The ones every request touches are cells of this thread
// (core/local_series.h), added to the registry's at each scrape; per-(backend, status, method)
// series are cached here, so finishing a request costs two hash lookups without allocating,
// rather than the registry's mutex.
class RequestSeries {
public:
    explicit RequestSeries(int thread);  // the loop thread's index
    ~RequestSeries();
    RequestSeries(const RequestSeries&) = delete;
    RequestSeries& operator=(const RequestSeries&) = delete;

    // `series` is the serving instance's (null when the balancer answered itself: label "none").
    void observe(BackendSeries* series, int status, std::string_view method, double duration_ms, Decision decision);
    void routed(Decision d) { decisions_[size_t(d)].add(); }
    void upstream_response(int status) { responses_[size_t(status / 100 <= 5 ? status / 100 : 0)].add(); }
    void body_received(uint64_t bytes) { received_.add(bytes); }
    void body_sent(uint64_t bytes) { sent_.add(bytes); }

    // Adds what every thread's cells gained since the last call to the registry (Metrics::render).
    static void publish_all();

private:
    void publish();  // under the registry of threads' series' lock

    struct PerBackend {
        std::unordered_map<uint32_t, prometheus::Counter*> requests;  // key: status * 16 + method index
        std::array<prometheus::Histogram*, kMethodLabels> durations{};
    };
    int thread_;
    PerBackend none_;
    std::array<LocalCounter, size_t(Decision::Count)> decisions_;
    std::array<LocalCounter, 6> responses_;  // index = status / 100 (0: none)
    LocalCounter received_, sent_;
    std::array<std::unique_ptr<LocalHistogram>, size_t(Decision::Count)> seconds_;
    std::array<prometheus::Histogram*, size_t(Decision::Count)> seconds_series_{};  // made when first published
};

}  // namespace stepflow
