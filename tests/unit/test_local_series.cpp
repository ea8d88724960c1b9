#include <catch2/catch.hpp>

#include <thread>

#include <prometheus/counter.h>
#include <prometheus/histogram.h>

#include "core/local_series.h"

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
