#include <catch2/catch.hpp>

#include <thread>

#include <prometheus/counter.h>
#include <prometheus/histogram.h>

#include "core/local_series.h"
#include "core/metrics_registry.h"

using namespace stepflow;

namespace {

prometheus::ClientMetric::Histogram collected(const prometheus::Histogram& h) { return h.Collect().histogram; }

}  // namespace

TEST_CASE("a thread's histogram cell publishes what prometheus' own Observe would have counted", "[metrics]") {
    const prometheus::Histogram::BucketBoundaries bounds{0.001, 0.01, 0.1, 1};
    prometheus::Histogram direct(bounds), published(bounds);
    LocalHistogram cell(bounds);
    CHECK_FALSE(cell.observed());
    // Below, on and between the bounds, and past the last: the bucket rule must match ("le").
    const double values[] = {0.0, 0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.99, 1.0, 1.5, 300};
    for (double v : values) {
        direct.Observe(v);
        cell.observe(v);
    }
    CHECK(cell.observed());
    cell.publish(published);
    auto want = collected(direct), got = collected(published);
    CHECK(got.sample_count == want.sample_count);
    CHECK(got.sample_sum == want.sample_sum);
    REQUIRE(got.bucket.size() == want.bucket.size());
    for (size_t i = 0; i < want.bucket.size(); ++i) CHECK(got.bucket[i].cumulative_count == want.bucket[i].cumulative_count);

    // A second scrape adds only what came since the first; one with nothing new changes nothing.
    cell.publish(published);
    CHECK(collected(published).sample_count == want.sample_count);
    direct.Observe(0.02);
    cell.observe(0.02);
    cell.publish(published);
    want = collected(direct);
    got = collected(published);
    CHECK(got.sample_count == want.sample_count);
    CHECK(got.sample_sum == want.sample_sum);
    for (size_t i = 0; i < want.bucket.size(); ++i) CHECK(got.bucket[i].cumulative_count == want.bucket[i].cumulative_count);
}

TEST_CASE("a thread's counter cell is published as increments, whatever thread scrapes", "[metrics]") {
    prometheus::Counter series;
    LocalCounter cell;
    cell.publish(series);
    CHECK(series.Value() == 0);
    std::thread writer([&] {
        for (int i = 0; i < 100000; ++i) cell.add(3);
    });
    double seen = 0;
    for (int i = 0; i < 100; ++i) {  // scrapes while the owner writes: never backwards
        cell.publish(series);
        CHECK(series.Value() >= seen);
        seen = series.Value();
    }
    writer.join();
    cell.publish(series);
    CHECK(series.Value() == 300000);
}

TEST_CASE("a backend's request series count every thread's requests at each scrape, none once retired", "[metrics]") {
    auto& registry = MetricsRegistry::get();
    auto series = registry.backend_series("192.0.2.7:8080");
    uint8_t post = method_index("POST");
    series->observe(0, 200, post, 3.0);
    series->observe(5, 200, post, 30.0);
    series->observe(5, 503, post, 1.0);
    registry.publish_backends();
    prometheus::Labels ok{{"backend", "192.0.2.7:8080"}, {"status", "200"}, {"method", "POST"}};
    prometheus::Labels busy{{"backend", "192.0.2.7:8080"}, {"status", "503"}, {"method", "POST"}};
    CHECK(registry.requests_total.Add(ok).Value() == 2);
    CHECK(registry.requests_total.Add(busy).Value() == 1);
    auto& ms = registry.request_duration_ms.Add({{"backend", "192.0.2.7:8080"}, {"method", "POST"}}, ms_buckets());
    CHECK(ms.Collect().histogram.sample_count == 3);
    CHECK(ms.Collect().histogram.sample_sum == 34.0);

    series->observe(0, 200, post, 3.0);
    registry.publish_backends();
    CHECK(registry.requests_total.Add(ok).Value() == 3);

    registry.retire_backend("192.0.2.7:8080");
    series->observe(0, 200, post, 3.0);  // after retirement: nothing, and nothing is re-added
    series->publish();
    bool listed = false;
    for (const auto& family : registry.registry().Collect())
        for (const auto& metric : family.metric)
            for (const auto& label : metric.label)
                if (label.value == "192.0.2.7:8080") listed = true;
    CHECK_FALSE(listed);
}
