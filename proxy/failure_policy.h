// What the client gets after a failure, in one place: the status, the JSON-RPC error body (with
// the request's id), whether the instance is charged a health failure, and whether the request
// may go to another instance. Call sites name the failure; they never pick a status themselves.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "proxy/metrics.h"

namespace stepflow {

enum class Failure : uint8_t {
    NoInstance,          // nothing takes new work
    PinnedUnknown,       // the pinned instance is not in the fleet
    PinnedNotServing,    // ... is in it but takes no work
    ConnectFailed,       // refused, unreachable, connect timeout: nothing reached the worker
    SocketFailed,        // no socket on our side (descriptors exhausted): not the instance's fault
    PooledClosedUnread,  // a pooled keep-alive connection closed before the worker read the request
                         // (proxy/delivery.h); labelled "stale-connection" as before
    ResetBeforeResponse, // a fresh connection the worker reset without reading the request
    MayHaveRun,          // closed after the whole request left, before a response: the call may have run
    HeadTimeout,         // no response head within --upstream-header-timeout
    BadResponse,         // the worker's response head broke HTTP/1.1 (never relayed)
    CutShort,            // the response broke after it had started
    WorkerAtCapacity,    // the worker answered 503 / -32300
    QueueFull,           // --queue-size requests wait already
    QueueTimeout,        // waited --queue-timeout for a free slot
    RequestBodyTimeout,  // the client stopped sending its body for --request-body-timeout
    UpstreamRequestTimeout,  // the worker took no body for --upstream-request-timeout
    SessionNotFound,     // a --session-header id whose instance is gone, or a sealed id that does not open
    SessionAmbiguous,    // the request carries more than one session header: which one counts is unclear
    Count
};

const char* to_string(Failure f);  // metric label and log reason

struct FailureVerdict {
    int status;            // to the client, when the response has not started
    bool charge_instance;  // counts towards --max-failures
    bool retriable;        // new work may go to another instance (never pinned work)
    bool retry_after;      // the answer carries Retry-After
};

// The decision. `decision` is how the request was routed (pinned requests are never sent to
// another instance). `repeatable`: the request may run twice without harm (proxy/delivery.h
// may_repeat); only then is a request that may have run sent again.
FailureVerdict judge(Failure f, Decision decision, bool repeatable = false);

// What the exchange observed when an attempt towards a worker failed before the response head.
struct AttemptFailure {
    Failure failure;
    Decision decision;
    bool repeatable;        // the request may run twice without harm (proxy/delivery.h may_repeat)
    bool replayable;        // what the worker was sent can be sent again (nothing relayed yet)
    bool fresh_retry_used;  // a pinned request already had its one fresh connection
    bool retries_left;      // fewer than --retries other instances tried
};

// What to do next, in this order: each step is taken when set and it can be; the request is
// answered (answer_failure) when none goes ahead.
struct AttemptVerdict {
    bool charge_instance;   // counts towards --max-failures
    bool fresh_connection;  // pinned: once more to the same instance on a new connection
    bool other_instance;    // new work: another instance, or back to the head of the queue
    bool requeue;           // no other instance takes it now: wait in the queue for a slot
    bool name_instance;     // the request reached the instance: the access log names it
};
AttemptVerdict judge_attempt(const AttemptFailure& a);

// The metrics (and log lines) of the failure path, counted where the verdict is carried out.
struct Instance;
void count_failed_attempt(const AttemptFailure& a);            // as observed, before any step
void count_retry(const AttemptFailure& a, bool other_instance);  // a fresh connection or another instance
void count_answered(const AttemptFailure& a, const Instance* inst, const char* why);  // no step went ahead
// A request refused before or instead of an attempt (routing, the queue): its metric.
void count_refused(Failure f, Decision decision);
// A worker's answer that is a failure (a malformed head, a -32300 refusal): its metric.
void count_worker_failure(Failure f);

// JSON-RPC error codes of the balancer's own answers besides -32000 (docs/admission.md).
constexpr int kCodeSessionNotFound = -32001;
constexpr int kCodeMayHaveRun = -32002;      // not "Instance not available": the call may have run
constexpr int kCodeLocalShortage = -32003;   // our descriptors or ports ran out, not the worker

// The balancer's own answer: always a JSON-RPC error body echoing `id_json`.
struct LocalAnswer {
    int status = 503;
    std::string body;
    bool retry_after = true;
};

// `pinned_id` names the instance a pinned request asked for (empty otherwise); `detail` is a
// free-text reason for data.detail (may be empty).
LocalAnswer answer_failure(Failure f, Decision decision, std::string_view id_json, std::string_view pinned_id,
                           std::string_view detail);

}  // namespace stepflow
