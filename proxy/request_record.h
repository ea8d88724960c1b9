// What a client connection remembers about one request for its access-log line and metrics,
// whichever protocol carried it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "discovery/instance.h"
#include "proxy/metrics.h"
#include "proxy/request_trace.h"

namespace stepflow {

class Exchange;
class LoopThread;

struct RequestRecord {
    std::chrono::steady_clock::time_point started;
    int status = 0;
    Decision decision = Decision::None;
    InstancePtr instance;  // where the request went; null when the balancer answered itself
    uint64_t bytes_in = 0;
    uint64_t bytes_out = 0;
    double queue_wait_ms = 0;  // time waited in the admission queue
    int retries = 0;           // further instances tried
    RequestTrace trace;        // its trace ids and server span (docs/tracing.md)

    void begin();
    std::string_view instance_id() const { return instance ? std::string_view(instance->id) : std::string_view(); }
    // Copies where the exchange went (kept after the exchange is gone).
    void note_route(const Exchange& exchange);
    // Observes the request metrics, writes the access-log line (with the trace ids) and ends
    // the server span.
    void finish(LoopThread& thread, std::string_view method, std::string_view target, const std::string& client);
};

}  // namespace stepflow
