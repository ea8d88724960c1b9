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
