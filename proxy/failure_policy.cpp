#include "proxy/failure_policy.h"

#include "core/http1.h"
#include "core/log.h"
#include "discovery/instance.h"
#include "proxy/local_response.h"

namespace stepflow {

const char* to_string(Failure f) {
    switch (f) {
    case Failure::NoInstance: return "no-instance";
    case Failure::PinnedUnknown: return "unknown-instance";
    case Failure::PinnedNotServing: return "not-serving";
    case Failure::ConnectFailed: return "connect-failed";
    case Failure::SocketFailed: return "socket-failed";
    case Failure::PooledClosedUnread: return "stale-connection";
    case Failure::ResetBeforeResponse: return "reset";
    case Failure::MayHaveRun: return "may-have-run";
    case Failure::HeadTimeout: return "timeout";
    case Failure::BadResponse: return "bad-response";
    case Failure::CutShort: return "cut-short";
    case Failure::WorkerAtCapacity: return "worker-at-capacity";
    case Failure::QueueFull: return "queue-full";
    case Failure::QueueTimeout: return "queue-timeout";
    case Failure::RequestBodyTimeout: return "request-body-timeout";
    case Failure::UpstreamRequestTimeout: return "upstream-request-timeout";
    case Failure::SessionNotFound: return "session-not-found";
    case Failure::SessionAmbiguous: return "ambiguous-session";
    case Failure::Count: break;
    }
    return "unknown";
}

FailureVerdict judge(Failure f, Decision decision, bool repeatable) {
    const bool unpinned = decision == Decision::LeastLoad;
    const bool pinned = is_pinned(decision);
    switch (f) {
    case Failure::NoInstance:
    case Failure::PinnedUnknown:
    case Failure::PinnedNotServing: return {503, false, false, true};
    // Nothing reached the worker: safe to send elsewhere; the instance is charged.
    case Failure::ConnectFailed: return {503, true, unpinned, true};
    case Failure::SocketFailed: return {503, false, unpinned, true};
    // A pooled connection the worker had closed: it never read the request. The race is benign,
    // not the worker's fault.
    case Failure::PooledClosedUnread: return {pinned ? 503 : 502, false, unpinned, pinned};
    // Reset without reading: provably not run, but a fresh connection should not be reset.
    case Failure::ResetBeforeResponse: return {pinned ? 503 : 502, true, unpinned, pinned};
    // The worker may have read it and started: sent again only when running twice is harmless.
    case Failure::MayHaveRun: return {pinned ? 503 : 502, true, unpinned && repeatable, pinned};
    // A slow worker is not a broken one.
    case Failure::HeadTimeout: return {504, false, false, false};
    // A head that breaks HTTP/1.1 is the worker's fault (a protocol failure): charged.
    case Failure::BadResponse: return {502, true, false, false};
    case Failure::CutShort: return {502, true, false, false};
    // Full is not broken, and nothing was created: another instance may take it.
    case Failure::WorkerAtCapacity: return {503, false, unpinned, true};
    case Failure::QueueFull:
    case Failure::QueueTimeout: return {503, false, false, true};
    // The client's fault: nothing to retry, nobody to charge.
    case Failure::RequestBodyTimeout: return {408, false, false, false};
    // A worker that does not read its body is slow, not broken (like HeadTimeout).
    case Failure::UpstreamRequestTimeout: return {504, false, false, false};
    // MCP: 404 tells the client to start a new session; nobody else knows this one.
    case Failure::SessionNotFound: return {404, false, false, false};
    // The client's fault, refused before any instance is chosen.
    case Failure::SessionAmbiguous: return {400, false, false, false};
    case Failure::Count: break;
    }
    return {502, false, false, false};
}

AttemptVerdict judge_attempt(const AttemptFailure& a) {
    FailureVerdict v = judge(a.failure, a.decision, a.repeatable);
    AttemptVerdict out{};
    out.charge_instance = v.charge_instance;
    // Pinned work cannot go elsewhere; a pooled connection the worker closed unread gets one
    // fresh one (our race, not the worker's answer).
    out.fresh_connection = is_pinned(a.decision) && a.failure == Failure::PooledClosedUnread && !a.fresh_retry_used &&
                           a.replayable;
    bool may_retry = v.retriable && a.replayable;
    out.other_instance = may_retry && a.retries_left;
    // Every instance is full (or its retries are spent): wait for a slot like new work, within
    // what is left of the queue deadline. A refusing instance is probed about once per
    // cool-down, by requests with retries left: one whose retries are spent waits for an
    // instance that answers again, so a worker refusing forever costs it --retries + 1 tries.
    out.requeue = may_retry && a.failure == Failure::WorkerAtCapacity;
    // One never reached (connect failures) is not where the request went.
    out.name_instance = a.failure != Failure::ConnectFailed && a.failure != Failure::SocketFailed;
    return out;
}

void count_failed_attempt(const AttemptFailure& a) {
    if (a.failure == Failure::ConnectFailed) Metrics::get().upstream_connect_errors.Increment();
}

void count_retry(const AttemptFailure& a, bool other_instance) {
    auto& m = Metrics::get();
    if (other_instance) m.upstream_retries.Increment();
    m.retries_by_reason[size_t(a.failure)]->Increment();
}

void count_refused(Failure f, Decision decision) {
    auto& m = Metrics::get();
    switch (f) {
    case Failure::NoInstance: m.no_healthy_instance.Increment(); break;
    case Failure::QueueFull: m.queue_rejections[0]->Increment(); break;
    case Failure::QueueTimeout: m.queue_rejections[1]->Increment(); break;
    case Failure::PinnedUnknown: m.pinned_misses[size_t(PinnedMiss::UnknownInstance)]->Increment(); break;
    case Failure::PinnedNotServing: m.pinned_misses[size_t(PinnedMiss::NotServing)]->Increment(); break;
    case Failure::SocketFailed:
        if (is_pinned(decision)) m.pinned_misses[size_t(PinnedMiss::ConnectFailed)]->Increment();
        break;
    default: break;
    }
}

void count_worker_failure(Failure f) {
    auto& m = Metrics::get();
    if (f == Failure::BadResponse) m.upstream_bad_responses.Increment();
    else if (f == Failure::WorkerAtCapacity) m.worker_at_capacity.Increment();
}

void count_answered(const AttemptFailure& a, const Instance* inst, const char* why) {
    auto& m = Metrics::get();
    if (a.failure == Failure::MayHaveRun && !is_pinned(a.decision)) {
        m.may_have_run.Increment();
        log::warn("not retried: the call may have run", {{"instance", inst ? inst->id : std::string()},
                                                         {"backend", inst ? inst->address : std::string()},
                                                         {"reason", why}});
    }
    if (is_pinned(a.decision)) m.pinned_misses[size_t(PinnedMiss::ConnectFailed)]->Increment();
}

namespace {

std::string data_of(Failure f, std::string_view pinned_id, std::string_view detail) {
    std::string data;
    if (!pinned_id.empty()) data = "\"instanceId\":" + json_string(pinned_id) + ",";
    data += "\"reason\":" + json_string(to_string(f));
    if (!detail.empty()) data += ",\"detail\":" + json_string(detail);
    return data;
}

}  // namespace

LocalAnswer answer_failure(Failure f, Decision decision, std::string_view id_json, std::string_view pinned_id,
                           std::string_view detail) {
    FailureVerdict v = judge(f, decision);
    int code = -32000;
    const char* message = nullptr;
    if (f == Failure::SessionNotFound) {
        code = kCodeSessionNotFound;
        message = "Session not found";
    } else if (f == Failure::SessionAmbiguous) {
        code = -32600;
        message = "More than one session header";
    } else if (f == Failure::SocketFailed) {
        // Ours, not the instance's: a pinned step is not abandoned on a misleading answer.
        code = kCodeLocalShortage;
        message = "Balancer out of local resources (descriptors or ports)";
    } else if (f == Failure::MayHaveRun && !is_pinned(decision)) {
        code = kCodeMayHaveRun;
        message = "Worker closed the connection after reading the request: the call may have run";
    } else if (is_pinned(decision) && v.status == 503) {
        message = "Instance not available";  // the orchestrator abandons the step on this
    } else if (f == Failure::NoInstance || f == Failure::ConnectFailed) {
        message = "No healthy instance available";
    } else if (f == Failure::QueueFull || f == Failure::QueueTimeout || f == Failure::WorkerAtCapacity) {
        message = "No capacity available";
    } else {
        message = http1::status_reason(v.status);
    }
    if (id_json.empty()) id_json = "null";
    return {v.status, jsonrpc_error(id_json, code, message, data_of(f, pinned_id, detail)), v.retry_after};
}

}  // namespace stepflow
