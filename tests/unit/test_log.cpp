#include <catch2/catch.hpp>

#include <chrono>
#include <cstdio>
#include <string>

#include <event2/event.h>

#include "core/log.h"

using namespace stepflow;

TEST_CASE("records written during one loop turn reach the writer as one batch", "[log]") {
    event_base* base = event_base_new();
    log::attach_loop(base);
    uint64_t before = log::batches_handed();
    for (int i = 0; i < 20; ++i) log::write(log::Level::Debug, "batched record", {{"n", i}});
    CHECK(log::batches_handed() == before);  // still in this thread's buffer: no lock, no wake yet
    event_base_loop(base, EVLOOP_NONBLOCK);   // the turn ends: the buffer is handed over once
    CHECK(log::batches_handed() == before + 1);
    log::write(log::Level::Debug, "after the turn");
    log::detach_loop();  // hands over what is left
    CHECK(log::batches_handed() == before + 2);
    event_base_free(base);
    log::flush(std::chrono::seconds(2));
}

TEST_CASE("a record written inside a correlation scope carries trace_id and span_id", "[log]") {
    log::Correlation ids;
    std::snprintf(ids.trace_id, sizeof ids.trace_id, "%s", "4bf92f3577b34da6a3ce929d0e0e4736");
    std::snprintf(ids.span_id, sizeof ids.span_id, "%s", "00f067aa0ba902b7");
    std::string line;
    {
        log::Scope scope(&ids);
        log::format_line(line, log::Level::Info, "request", {{"status", 200}});
    }
    CHECK(line.find("\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"00f067aa0ba902b7\"") != std::string::npos);
    line.clear();
    log::format_line(line, log::Level::Info, "request", {{"status", 200}});
    CHECK(line.find("trace_id") == std::string::npos);  // the scope ended
}

TEST_CASE("field values are written as printf and the JSON escapes would write them", "[log]") {
    log::configure(log::Level::Info, log::Format::Json);
    // Doubles as "%.3f" (halfway cases included: the exact binary value decides), integers in
    // full, strings escaped; the time as YYYY-MM-DDTHH:MM:SS.uuuuuuZ.
    const double doubles[] = {0.0, 0.0005, 1.0005, 2.5, 12.3456, -3.25, 1e-7, 123456789.987654, 1e20};
    for (double d : doubles) {
        char want[64];
        std::snprintf(want, sizeof want, "\"d\":%.3f}", d);
        std::string line;
        log::format_line(line, log::Level::Info, "m", {{"d", d}});
        CHECK(line.find(want) != std::string::npos);
    }
    std::string line;
    log::format_line(line, log::Level::Info, "m",
                     {{"i", int64_t(-9223372036854775807LL - 1)}, {"u", uint64_t(42)},
                      {"s", std::string_view("a\"b\\c\nd\x01" "e\xc3\xa9")}, {"b", false}});
    CHECK(line.find("\"i\":-9223372036854775808,\"u\":42,\"s\":\"a\\\"b\\\\c\\nd\\u0001e\xc3\xa9\",\"b\":false}") !=
          std::string::npos);
    int y, mo, d, h, mi, s, us;
    char z;
    REQUIRE(std::sscanf(line.c_str(), "{\"time\":\"%4d-%2d-%2dT%2d:%2d:%2d.%6d%c\"", &y, &mo, &d, &h, &mi, &s, &us, &z) == 8);
    CHECK(line[36] == '"');  // {"time":" and 27 characters
    CHECK(z == 'Z');
    CHECK((y >= 2024 && mo >= 1 && mo <= 12 && d >= 1 && d <= 31 && h < 24 && mi < 60 && s < 61 && us < 1000000));
}
