#include <catch2/catch.hpp>

#include "core/net.h"
#include "discovery/fleet.h"
#include "proxy/admission.h"
#include "proxy/delivery.h"
#include "proxy/failure_policy.h"
#include "proxy/replay_buffer.h"
#include "proxy/router.h"
#include "tests/unit/instances.h"

#include <event2/buffer.h>

using namespace stepflow;

using stepflow::testing::instance;

TEST_CASE("endpoint-load-metrics capacity, '=' or ':'", "[admission]") {
    CHECK(load_report_capacity("TEXT named_metrics.capacity=4, named_metrics.inflight=3") == 4);
    CHECK(load_report_capacity("TEXT named_metrics.inflight=3, named_metrics.capacity: 7") == 7);
    CHECK(load_report_capacity("TEXT named_metrics.capacity=4.0") == 4);
    CHECK(load_report_capacity("TEXT named_metrics.capacity=0") == 0);
    CHECK(load_report_capacity("TEXT named_metrics.capacity=-2") == 0);
    CHECK(load_report_capacity("TEXT named_metrics.capacity=4x") == 0);
    CHECK(load_report_capacity("JSON {\"named_metrics\":{\"capacity\":4}}") == 0);
    CHECK(load_report_capacity("TEXT cpu_utilization=0.3") == 0);
    CHECK(load_report_capacity("") == 0);
}

TEST_CASE("least load with need_room skips full instances", "[admission]") {
    auto a = instance("a", 10001), b = instance("b", 10002);
    a->capacity.set_flag(1);
    b->capacity.set_flag(1);
    auto fleet = make_fleet(1, {a, b});
    Rng rng(7);
    CHECK(a->capacity.try_take());
    CHECK(route_least_load(*fleet, rng, {}, true) == b.get());
    CHECK(b->capacity.try_take());
    CHECK(route_least_load(*fleet, rng, {}, true) == nullptr);
    CHECK(route_least_load(*fleet, rng, {}, false) != nullptr);  // pinned-free routing ignores limits
}

TEST_CASE("delivery: what was observed decides whether the worker may have read the request", "[admission]") {
    // observe_delivery(reset, all_sent, response_seen)
    CHECK(observe_delivery(false, false, false) == Delivery::NotRead);    // closed before the last byte left
    CHECK(observe_delivery(true, true, false) == Delivery::NotRead);      // reset: it never read it all
    CHECK(observe_delivery(false, true, false) == Delivery::MayHaveRun);  // FIN after the whole request
    CHECK(observe_delivery(true, true, true) == Delivery::MayHaveRun);    // it answered something
    CHECK(close_failure(Delivery::NotRead, true) == Failure::PooledClosedUnread);
    CHECK(close_failure(Delivery::NotRead, false) == Failure::ResetBeforeResponse);
    CHECK(close_failure(Delivery::MayHaveRun, true) == Failure::MayHaveRun);
    for (const char* m : {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}) CHECK(idempotent_method(m));
    CHECK_FALSE(idempotent_method("POST"));
    CHECK_FALSE(idempotent_method("PATCH"));
}

TEST_CASE("failure policy: charge and retry per failure", "[admission]") {
    CHECK(judge(Failure::WorkerAtCapacity, Decision::LeastLoad).retriable);
    CHECK_FALSE(judge(Failure::WorkerAtCapacity, Decision::LeastLoad).charge_instance);
    CHECK_FALSE(judge(Failure::QueueTimeout, Decision::LeastLoad).charge_instance);
    CHECK(judge(Failure::ConnectFailed, Decision::LeastLoad).charge_instance);
    CHECK(judge(Failure::PooledClosedUnread, Decision::LeastLoad).retriable);
    CHECK_FALSE(judge(Failure::PooledClosedUnread, Decision::PinnedByHeader).retriable);
    CHECK_FALSE(judge(Failure::PooledClosedUnread, Decision::LeastLoad).charge_instance);  // benign race
    CHECK(judge(Failure::ResetBeforeResponse, Decision::LeastLoad).retriable);  // reset unread: never ran
    CHECK(judge(Failure::ResetBeforeResponse, Decision::PinnedByHeader).status == 503);
    // At most once: a call the worker may have read goes nowhere else unless it is repeatable.
    CHECK_FALSE(judge(Failure::MayHaveRun, Decision::LeastLoad).retriable);
    CHECK(judge(Failure::MayHaveRun, Decision::LeastLoad, true).retriable);
    CHECK_FALSE(judge(Failure::MayHaveRun, Decision::PinnedByHeader, true).retriable);
    CHECK(judge(Failure::MayHaveRun, Decision::LeastLoad).status == 502);
    LocalAnswer m = answer_failure(Failure::MayHaveRun, Decision::LeastLoad, "5", "", "");
    CHECK(m.status == 502);
    CHECK(m.body.find("\"code\":-32002") != std::string::npos);
    CHECK(m.body.find("may have run") != std::string::npos);
    LocalAnswer own = answer_failure(Failure::SocketFailed, Decision::PinnedByHeader, "5", "inst-1", "");
    CHECK(own.status == 503);
    CHECK(own.body.find("Instance not available") == std::string::npos);  // ours, not the instance's
    CHECK(own.body.find("\"code\":-32003") != std::string::npos);
    CHECK(judge(Failure::HeadTimeout, Decision::LeastLoad).status == 504);
    LocalAnswer a = answer_failure(Failure::QueueFull, Decision::LeastLoad, "7", "", "");
    CHECK(a.status == 503);
    CHECK(a.retry_after);
    CHECK(a.body == R"({"jsonrpc":"2.0","id":7,"error":{"code":-32000,"message":"No capacity available","data":{"reason":"queue-full"}}})");
    a = answer_failure(Failure::ConnectFailed, Decision::PinnedByHeader, "\"x\"", "inst-1", "connection refused");
    CHECK(a.body == R"({"jsonrpc":"2.0","id":"x","error":{"code":-32000,"message":"Instance not available","data":{"instanceId":"inst-1","reason":"connect-failed","detail":"connection refused"}}})");
    // A malformed response head is the worker's fault: charged, never retried (issue 22).
    CHECK(judge(Failure::BadResponse, Decision::LeastLoad).charge_instance);
    CHECK_FALSE(judge(Failure::BadResponse, Decision::LeastLoad).retriable);
    CHECK(judge(Failure::BadResponse, Decision::PinnedByHeader).status == 502);
    // Two session headers: the client's fault, 400 Invalid Request with its id.
    a = answer_failure(Failure::SessionAmbiguous, Decision::None, "5", "", "");
    CHECK(a.status == 400);
    CHECK_FALSE(judge(Failure::SessionAmbiguous, Decision::None).charge_instance);
    CHECK(a.body == R"({"jsonrpc":"2.0","id":5,"error":{"code":-32600,"message":"More than one session header","data":{"reason":"ambiguous-session"}}})");
}

TEST_CASE("failure policy: the steps after a failed attempt", "[admission]") {
    // {failure, decision, repeatable, replayable, fresh_retry_used, retries_left}
    AttemptVerdict v = judge_attempt({Failure::PooledClosedUnread, Decision::PinnedBySession, false, true, false, true});
    CHECK(v.fresh_connection);  // a pinned request gets one fresh connection after our own race
    CHECK_FALSE(v.other_instance);
    CHECK_FALSE(v.charge_instance);
    CHECK_FALSE(judge_attempt({Failure::PooledClosedUnread, Decision::PinnedByHeader, false, true, true, true}).fresh_connection);
    CHECK_FALSE(judge_attempt({Failure::PooledClosedUnread, Decision::PinnedByHeader, false, false, false, true}).fresh_connection);
    v = judge_attempt({Failure::PooledClosedUnread, Decision::LeastLoad, false, true, false, true});
    CHECK(v.other_instance);
    CHECK_FALSE(v.fresh_connection);
    CHECK_FALSE(v.requeue);
    // -32300: another instance while retries are left, else the queue again.
    v = judge_attempt({Failure::WorkerAtCapacity, Decision::LeastLoad, false, true, false, false});
    CHECK_FALSE(v.other_instance);
    CHECK(v.requeue);
    CHECK(v.name_instance);
    // A body that cannot be sent again (over --retry-buffer-size) is answered.
    v = judge_attempt({Failure::WorkerAtCapacity, Decision::LeastLoad, false, false, false, true});
    CHECK_FALSE(v.other_instance);
    CHECK_FALSE(v.requeue);
    // At most once: only a repeatable request that may have run goes elsewhere.
    CHECK_FALSE(judge_attempt({Failure::MayHaveRun, Decision::LeastLoad, false, true, false, true}).other_instance);
    CHECK(judge_attempt({Failure::MayHaveRun, Decision::LeastLoad, true, true, false, true}).other_instance);
    // A connect failure is charged, and the access log names no instance.
    v = judge_attempt({Failure::ConnectFailed, Decision::PinnedByHeader, false, true, false, true});
    CHECK(v.charge_instance);
    CHECK_FALSE(v.other_instance);
    CHECK_FALSE(v.name_instance);
}

TEST_CASE("failure policy: the metric of a refusal or a worker's failed answer", "[admission]") {
    auto& m = Metrics::get();
    auto counted = [](prometheus::Counter* c, auto&& step) {
        double before = c->Value();
        step();
        return c->Value() - before;
    };
    CHECK(counted(&m.no_healthy_instance, [] { count_refused(Failure::NoInstance, Decision::None); }) == 1);
    CHECK(counted(m.queue_rejections[0], [] { count_refused(Failure::QueueFull, Decision::LeastLoad); }) == 1);
    CHECK(counted(m.queue_rejections[1], [] { count_refused(Failure::QueueTimeout, Decision::LeastLoad); }) == 1);
    auto* unknown = m.pinned_misses[size_t(PinnedMiss::UnknownInstance)];
    CHECK(counted(unknown, [] { count_refused(Failure::PinnedUnknown, Decision::PinnedByHeader); }) == 1);
    auto* not_serving = m.pinned_misses[size_t(PinnedMiss::NotServing)];
    CHECK(counted(not_serving, [] { count_refused(Failure::PinnedNotServing, Decision::PinnedBySession); }) == 1);
    // Our own socket shortage is a pinned miss only for pinned work.
    auto* connect = m.pinned_misses[size_t(PinnedMiss::ConnectFailed)];
    CHECK(counted(connect, [] { count_refused(Failure::SocketFailed, Decision::PinnedByHeader); }) == 1);
    CHECK(counted(connect, [] { count_refused(Failure::SocketFailed, Decision::LeastLoad); }) == 0);
    CHECK(counted(&m.upstream_bad_responses, [] { count_worker_failure(Failure::BadResponse); }) == 1);
    CHECK(counted(&m.worker_at_capacity, [] { count_worker_failure(Failure::WorkerAtCapacity); }) == 1);
}

TEST_CASE("replay buffer: the payload, framed again for a retry", "[admission]") {
    ReplayBuffer replay(16);
    CHECK_FALSE(replay.consumed());
    replay.keep("{\"id\":", 6);
    evbuffer* in = evbuffer_new();
    evbuffer_add(in, "7}rest", 6);
    replay.payload(in, 2);  // the first two bytes of `in`
    CHECK(evbuffer_get_length(in) == 6);  // copied, not taken
    CHECK(replay.consumed());
    CHECK(replay.complete());
    CHECK(replay.view() == "{\"id\":7}");
    CHECK(replay.id_json() == "7");
    evbuffer* out = evbuffer_new();
    replay.resend(out, true, true);
    std::string wire(evbuffer_get_length(out), '\0');
    evbuffer_remove(out, wire.data(), wire.size());
    CHECK(wire == "8\r\n{\"id\":7}\r\n0\r\n\r\n");
    replay.resend(out, false, true);
    CHECK(evbuffer_get_length(out) == 8);
    // Over the bound: dropped, and the request is no longer replayable.
    replay.keep("0123456789", 10);
    CHECK_FALSE(replay.complete());
    CHECK(replay.id_json().empty());
    evbuffer_free(in);
    evbuffer_free(out);
}
