// One request's place in a distributed trace: the trace it continues (an incoming traceparent)
// or starts, its SERVER span, and one CLIENT span per attempt towards a worker (AttemptSpan), so
// a retry or a re-queue shows as a second attempt under the same server span. docs/tracing.md.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/http1.h"
#include "core/log.h"
#include "core/trace_context.h"
#include "proxy/failure_policy.h"
#include "proxy/span.h"

namespace stepflow {

struct Instance;

struct RequestTrace {
    bool active = false;     // ids exist: log lines carry them
    bool ours = false;       // tracing is on: we are a hop (our span ids, our traceparent upstream)
    bool recording = false;  // sampled and tracing on: spans are exported
    bool has_parent = false;
    bool ended = false;      // the server span went out
    trace::Ids ids;          // trace id, the server span's id, flags
    uint8_t parent_span_id[8] = {};
    log::Correlation log_ids;
    uint64_t start_ns = 0;
    int attempts = 0;
    // What the spans say, allocated only for a sampled request: an untraced one carries none of it.
    struct Recording {
        std::string method, path, user_agent, mcp_method, rpc_method, rpc_id;
        std::vector<std::pair<uint64_t, uint64_t>> queue_waits;  // unix ns
    };
    // Recordings are kept per thread for the next requests (their strings keep their capacity),
    // so a traced request allocates none.
    struct Release {
        void operator()(Recording* r) const;
    };
    std::unique_ptr<Recording, Release> rec;

    // A request head arrived (parsed): continue its traceparent or start a trace.
    void begin(const http1::Head& request);
    void reset() {
        active = ours = recording = has_parent = ended = false;
        attempts = 0;
        rec.reset();
    }
    const log::Correlation* correlation() const { return active ? &log_ids : nullptr; }
    // The admission queue held the request from `from` to `to` (unix ns).
    void note_queue_wait(uint64_t from_ns, uint64_t to_ns) {
        if (recording) rec->queue_waits.emplace_back(from_ns, to_ns);
    }
    // The JSON-RPC method and id of the body, for rpc.* attributes (recording only).
    void note_jsonrpc(std::string_view body);

    struct Outcome {
        int status = 0;
        std::string_view decision, instance_id, client_ip;
        uint64_t bytes_in = 0, bytes_out = 0;
        double queue_wait_ms = 0;
        int retries = 0;
    };
    // The response ended: the server span (and the queue-wait child spans) go to the exporter.
    void end(const Outcome& outcome);
};

// The CLIENT span of one attempt towards a worker; owned by the exchange.
class AttemptSpan {
public:
    // A new attempt to `inst` (number: 1 for the first); a no-op unless the trace is ours.
    void start(RequestTrace* trace, const Instance& inst, std::string_view decision);
    bool open() const { return open_; }
    // The trace is one we started (no valid traceparent came): an incoming tracestate belongs to
    // no trace of ours and is not passed on (W3C Trace Context's processing model).
    bool new_trace() const { return new_trace_; }
    // `traceparent: 00-<trace>-<this span>-<flags>\r\n` for the worker's request head.
    void append_traceparent(std::string& head) const;
    // The attempt ended: with the worker's status (0: none), or with a failure kind.
    void end(int status, const Failure* failure, std::string_view why, uint64_t bytes_out);
    // The client went away (or the request was otherwise abandoned) during the attempt.
    void cancel(int status, uint64_t bytes_out);

private:
    // Copied at start: the attempt may end after the request's record is gone.
    bool open_ = false;
    bool new_trace_ = false;
    bool recording_ = false;
    uint8_t trace_id_[16] = {};
    uint8_t span_id_[8] = {};
    uint8_t flags_ = 0;
    bool cancelled_ = false;
    std::string record_;  // the span's record while recording (trace::record)
};

}  // namespace stepflow
