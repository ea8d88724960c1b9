#include "proxy/request_record.h"

#include "core/log.h"
#include "proxy/exchange.h"
#include "proxy/loop_thread.h"

namespace stepflow {

void RequestRecord::begin() {
    started = std::chrono::steady_clock::now();
    status = 0;
    decision = Decision::None;
    instance.reset();
    bytes_in = bytes_out = 0;
    queue_wait_ms = 0;
    retries = 0;
    trace.reset();
}

void RequestRecord::note_route(const Exchange& exchange) {
    decision = exchange.decision();
    instance = exchange.routed_instance();
    bytes_out = exchange.response_bytes();
    queue_wait_ms = exchange.queue_wait_ms();
    retries = exchange.retries();
}

void RequestRecord::finish(LoopThread& thread, std::string_view method, std::string_view target,
                           const std::string& client) {
    auto now = std::chrono::steady_clock::now();
    double ms = std::chrono::duration<double, std::milli>(now - started).count();
    thread.series().observe(instance ? instance->series.get() : nullptr, status, method, ms, decision);
    if (trace.recording)
        trace.end({status, to_string(decision), instance_id(), client, bytes_in, bytes_out, queue_wait_ms, retries});
    if (!thread.config().access_log) return;
    log::Scope ids(trace.correlation());
    log::At at(now);  // the line's time is the reading the duration came from
    log::info("request", {{"method", method},
                          {"path", target.substr(0, target.find('?'))},
                          {"status", status},
                          {"instance", instance_id()},
                          {"decision", to_string(decision)},
                          {"duration_ms", ms},
                          {"bytes_in", bytes_in},
                          {"bytes_out", bytes_out},
                          {"queue_wait_ms", queue_wait_ms},
                          {"retries", retries},
                          {"client", client}});
}

}  // namespace stepflow
