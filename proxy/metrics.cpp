#include "proxy/metrics.h"

#include "proxy/failure_policy.h"

#include <algorithm>
#include <set>

#include <prometheus/text_serializer.h>

#include "core/log.h"
#include "discovery/discovery_metrics.h"
#include "discovery/fleet.h"
#include "proxy/span.h"

namespace stepflow {
namespace {

// One family, two series: the help text must match for the registry to merge them.
constexpr const char* kSpansDroppedHelp =
    "Spans dropped, by reason: queue-full (the export queue was full), export-failed (the collector "
    "did not take them after retries)";

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

std::mutex g_family_mutex;  // Family::Add is internally locked; this guards our lazy caches

const prometheus::Histogram::BucketBoundaries& seconds_buckets() {
    static const prometheus::Histogram::BucketBoundaries b{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                           0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
    return b;
}

// Every request thread's series, for scrapes to publish.
std::mutex g_threads_mutex;
std::vector<RequestSeries*>& thread_series() {
    static auto* all = new std::vector<RequestSeries*>;
    return *all;
}

}  // namespace

const char* to_string(Decision d) {
    switch (d) {
    case Decision::PinnedByHeader:
    case Decision::PinnedBySession: return "pinned";
    case Decision::LeastLoad: return "least-load";
    case Decision::None:
    case Decision::Count: break;
    }
    return "none";
}

Metrics& Metrics::get() {
    // The families of the layers below register first, so scrapes list every family in the order
    // they always have (the exposition goes by type, then by registration).
    static Metrics* metrics = [] {
        DiscoveryMetrics::get();
        return new Metrics(MetricsRegistry::get().registry());
    }();
    return *metrics;
}

Metrics::Metrics(prometheus::Registry& r)
    : request_duration_seconds(BuildHistogram().Name("stepflow_lb_request_duration_seconds")
                                   .Help("Request duration in seconds, head received to response end, by routing decision")
                                   .Register(r)),
      active_connections(BuildGauge().Name("stepflow_lb_active_connections")
                             .Help("Requests in flight per backend address (compatible name)").Register(r)),
      instance_in_flight(BuildGauge().Name("stepflow_lb_instance_in_flight")
                             .Help("Requests in flight per instance, SSE streams included").Register(r)),
      backend_health(BuildGauge().Name("stepflow_lb_backend_health")
                         .Help("1 when the instance takes new work, else 0").Register(r)),
      backend_pool_size(BuildGauge().Name("stepflow_lb_backend_pool_size")
                            .Help("Instances that take new work (healthy, not draining)").Register(r).Add({})),
      backends_known(BuildGauge().Name("stepflow_lb_backends_known")
                         .Help("Backends discovery currently reports, whatever their state").Register(r).Add({})),
      no_healthy_instance(BuildCounter().Name("stepflow_lb_no_healthy_instance_total")
                              .Help("Unpinned requests answered 503 because no instance takes new work")
                              .Register(r).Add({})),
      rejected_requests(BuildCounter().Name("stepflow_lb_rejected_requests_total")
                            .Help("Malformed or oversized requests answered without contacting a worker")
                            .Register(r).Add({})),
      upstream_connect_errors(BuildCounter().Name("stepflow_lb_upstream_connect_errors_total")
                                  .Help("Failed connection attempts to workers").Register(r).Add({})),
      upstream_retries(BuildCounter().Name("stepflow_lb_upstream_retries_total")
                           .Help("Unpinned requests re-sent to another instance (connect failure, stale connection, -32300)")
                           .Register(r).Add({})),
      upstream_bad_responses(BuildCounter().Name("stepflow_lb_upstream_bad_responses_total")
                                 .Help("Worker response heads refused as malformed (answered 502, instance charged)")
                                 .Register(r).Add({})),
      queue_depth(BuildGauge().Name("stepflow_lb_queue_depth")
                      .Help("New requests waiting for a free slot (all threads)").Register(r).Add({})),
      queue_wait_seconds(BuildHistogram().Name("stepflow_lb_queue_wait_seconds")
                             .Help("Time new requests waited in the admission queue").Register(r)
                             .Add({}, prometheus::Histogram::BucketBoundaries{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                                              0.5, 1, 2.5, 5, 10, 30, 60})),
      worker_at_capacity(BuildCounter().Name("stepflow_lb_worker_at_capacity_total")
                             .Help("503 / -32300 answers from workers (each also cuts that instance's limit)")
                             .Register(r).Add({})),
      may_have_run(BuildCounter().Name("stepflow_lb_may_have_run_total")
                       .Help("Requests answered 502 unretried because the worker may have read them before its "
                             "connection closed (the call may have run)")
                       .Register(r).Add({})),
      upstream_idle_closed(BuildCounter().Name("stepflow_lb_upstream_reuse_refused_total")
                               .Help("Pooled worker connections dropped instead of reused because the worker had "
                                     "closed them (or sent stray bytes)")
                               .Register(r).Add({})),
      instance_limit(BuildGauge().Name("stepflow_lb_instance_limit")
                         .Help("Limit on new requests in flight per instance (0: unlimited)").Register(r)),
      sse_streams_open(BuildGauge().Name("stepflow_lb_sse_streams_open")
                           .Help("text/event-stream responses currently streaming").Register(r).Add({})),
      sse_streams_total(BuildCounter().Name("stepflow_lb_sse_streams_total")
                            .Help("text/event-stream responses started").Register(r).Add({})),
      client_received_bytes(BuildCounter().Name("stepflow_lb_client_received_bytes_total")
                                .Help("Request body bytes received from clients").Register(r).Add({})),
      client_sent_bytes(BuildCounter().Name("stepflow_lb_client_sent_bytes_total")
                            .Help("Response body bytes sent to clients").Register(r).Add({})),
      client_connections(BuildGauge().Name("stepflow_lb_client_connections")
                             .Help("Open client connections").Register(r).Add({})),
      connections_refused(BuildCounter().Name("stepflow_lb_client_connections_refused_total")
                              .Help("Client connections closed at accept because --max-connections were open")
                              .Register(r).Add({})),
      accept_pauses(BuildCounter().Name("stepflow_lb_accept_pauses_total")
                        .Help("Times accepting paused because accept() found no descriptor or memory")
                        .Register(r).Add({})),
      log_lines_dropped(BuildCounter().Name("stepflow_lb_log_lines_dropped_total")
                            .Help("Log records dropped because stderr did not keep up (queue full)")
                            .Register(r).Add({})),
      trace_spans_exported(BuildCounter().Name("stepflow_lb_trace_spans_exported_total")
                               .Help("Spans the OTLP collector accepted").Register(r).Add({})),
      trace_spans_queue_dropped(BuildCounter().Name("stepflow_lb_trace_spans_dropped_total")
                                    .Help(kSpansDroppedHelp)
                                    .Register(r).Add({{"reason", "queue-full"}})),
      trace_spans_export_dropped(BuildCounter().Name("stepflow_lb_trace_spans_dropped_total")
                                     .Help(kSpansDroppedHelp)
                                     .Register(r).Add({{"reason", "export-failed"}})),
      trace_spans_rejected(BuildCounter().Name("stepflow_lb_trace_spans_dropped_total")
                               .Help(kSpansDroppedHelp)
                               .Register(r).Add({{"reason", "rejected"}})),
      trace_export_failures(BuildCounter().Name("stepflow_lb_trace_export_failures_total")
                                .Help("OTLP export attempts that failed (each retry counts)").Register(r).Add({})) {
    auto& decisions = BuildCounter().Name("stepflow_lb_routing_decisions_total")
                          .Help("Requests routed, by decision").Register(r);
    // One "pinned" series for both pins (the same series: Add returns it for equal labels).
    routing_decisions[size_t(Decision::PinnedByHeader)] = &decisions.Add({{"decision", "pinned"}});
    routing_decisions[size_t(Decision::PinnedBySession)] = &decisions.Add({{"decision", "pinned"}});
    routing_decisions[size_t(Decision::LeastLoad)] = &decisions.Add({{"decision", "least-load"}});
    routing_decisions[size_t(Decision::None)] = &decisions.Add({{"decision", "none"}});
    auto& misses = BuildCounter().Name("stepflow_lb_pinned_misses_total")
                       .Help("Pinned requests answered 503 Instance not available, by reason").Register(r);
    pinned_misses[size_t(PinnedMiss::UnknownInstance)] = &misses.Add({{"reason", "unknown-instance"}});
    pinned_misses[size_t(PinnedMiss::NotServing)] = &misses.Add({{"reason", "not-serving"}});
    pinned_misses[size_t(PinnedMiss::ConnectFailed)] = &misses.Add({{"reason", "connect-failed"}});
    auto& rejections = BuildCounter().Name("stepflow_lb_queue_rejections_total")
                           .Help("New requests answered 503 by the admission queue, by reason").Register(r);
    queue_rejections[0] = &rejections.Add({{"reason", "queue-full"}});
    queue_rejections[1] = &rejections.Add({{"reason", "queue-timeout"}});
    auto& retries = BuildCounter().Name("stepflow_lb_retries_total")
                        .Help("New requests sent to another instance (or back to the queue), by reason").Register(r);
    static_assert(size_t(Failure::Count) <= std::tuple_size_v<decltype(retries_by_reason)>);
    for (Failure f : {Failure::ConnectFailed, Failure::SocketFailed, Failure::PooledClosedUnread, Failure::ResetBeforeResponse,
                      Failure::MayHaveRun, Failure::WorkerAtCapacity})
        retries_by_reason[size_t(f)] = &retries.Add({{"reason", to_string(f)}});
    auto& responses = BuildCounter().Name("stepflow_lb_upstream_responses_total")
                          .Help("Responses received from workers, by status class").Register(r);
    const char* classes[] = {"none", "1xx", "2xx", "3xx", "4xx", "5xx"};
    for (size_t i = 0; i < upstream_responses.size(); ++i)
        upstream_responses[i] = &responses.Add({{"class", classes[i]}});
}

std::string Metrics::render(const Fleet& fleet, size_t known) {
    {
        std::lock_guard lock(fleet_series_mutex_);
        std::set<std::string> live_ids, live_backends;
        std::map<std::string, double> per_backend;
        double pool = 0;
        for (const auto& inst : fleet.instances) {
            live_ids.insert(inst->id);
            live_backends.insert(inst->address);
            auto it = instance_series_.find(inst->id);
            if (it == instance_series_.end()) {
                prometheus::Labels labels{{"backend", inst->address}, {"instance_id", inst->id}};
                it = instance_series_.emplace(inst->id, InstanceSeries{&backend_health.Add(labels),
                                                                       &instance_in_flight.Add(labels),
                                                                       &instance_limit.Add(labels)}).first;
            }
            bool takes = inst->takes_new_work();
            pool += takes ? 1 : 0;
            double in_flight = inst->in_flight.load(std::memory_order_relaxed);
            it->second.health->Set(takes ? 1 : 0);
            it->second.in_flight->Set(in_flight);
            it->second.limit->Set(inst->capacity.limit());
            per_backend[inst->address] += in_flight;
        }
        for (auto it = instance_series_.begin(); it != instance_series_.end();) {
            if (live_ids.count(it->first)) { ++it; continue; }
            backend_health.Remove(it->second.health);
            instance_in_flight.Remove(it->second.in_flight);
            instance_limit.Remove(it->second.limit);
            it = instance_series_.erase(it);
        }
        for (auto& [backend, value] : per_backend) {
            auto it = backend_series_.find(backend);
            if (it == backend_series_.end())
                it = backend_series_.emplace(backend, &active_connections.Add({{"backend", backend}})).first;
            it->second->Set(value);
        }
        for (auto it = backend_series_.begin(); it != backend_series_.end();) {
            if (live_backends.count(it->first)) { ++it; continue; }
            active_connections.Remove(it->second);
            it = backend_series_.erase(it);
        }
        backend_pool_size.Set(pool);
        double dropped = double(log::dropped_lines());
        if (dropped > log_lines_dropped.Value()) log_lines_dropped.Increment(dropped - log_lines_dropped.Value());
        double spans_dropped = double(trace::Queue::dropped());
        if (spans_dropped > trace_spans_queue_dropped.Value())
            trace_spans_queue_dropped.Increment(spans_dropped - trace_spans_queue_dropped.Value());
        backends_known.Set(double(known));
    }
    RequestSeries::publish_all();
    return prometheus::TextSerializer{}.Serialize(registry().Collect());
}

RequestSeries::RequestSeries(int thread) : thread_(thread) {
    for (auto& cell : seconds_) cell = std::make_unique<LocalHistogram>(seconds_buckets());
    std::lock_guard lock(g_threads_mutex);
    thread_series().push_back(this);
}

RequestSeries::~RequestSeries() {
    std::lock_guard lock(g_threads_mutex);
    publish();  // what this thread counted last stays counted
    auto& all = thread_series();
    all.erase(std::find(all.begin(), all.end(), this));
}

void RequestSeries::publish_all() {
    {
        std::lock_guard lock(g_threads_mutex);
        for (RequestSeries* s : thread_series()) s->publish();
    }
    MetricsRegistry::get().publish_backends();
}

void RequestSeries::publish() {
    auto& m = Metrics::get();
    for (size_t d = 0; d < decisions_.size(); ++d) decisions_[d].publish(*m.routing_decisions[d]);
    for (size_t c = 0; c < responses_.size(); ++c) responses_[c].publish(*m.upstream_responses[c]);
    received_.publish(m.client_received_bytes);
    sent_.publish(m.client_sent_bytes);
    for (size_t d = 0; d < seconds_.size(); ++d) {
        if (!seconds_[d]->observed()) continue;  // a series appears with its first request
        auto& series = seconds_series_[d];
        if (!series) {
            std::lock_guard lock(g_family_mutex);
            series = &m.request_duration_seconds.Add({{"decision", to_string(Decision(d))}}, seconds_buckets());
        }
        seconds_[d]->publish(*series);
    }
}

void RequestSeries::observe(BackendSeries* series, int status, std::string_view method, double duration_ms,
                            Decision decision) {
    auto& core = MetricsRegistry::get();
    uint8_t mi = method_index(method);
    if (series) {
        series->observe(thread_, status, mi, duration_ms);
    } else {
        // Answered by the balancer itself: one fixed label, cached per thread.
        uint32_t key = uint32_t(status) * 16 + mi;
        auto cit = none_.requests.find(key);
        if (cit == none_.requests.end()) {
            std::lock_guard lock(g_family_mutex);
            auto* c = &core.requests_total.Add(
                {{"backend", "none"}, {"status", std::to_string(status)}, {"method", method_label(mi)}});
            cit = none_.requests.emplace(key, c).first;
        }
        cit->second->Increment();
        if (core.compat_metrics()) {
            auto& hist = none_.durations[mi];
            if (!hist) {
                std::lock_guard lock(g_family_mutex);
                hist = &core.request_duration_ms.Add({{"backend", "none"}, {"method", method_label(mi)}}, ms_buckets());
            }
            hist->Observe(duration_ms);
        }
    }

    seconds_[size_t(decision)]->observe(duration_ms / 1000.0);
}

}  // namespace stepflow
