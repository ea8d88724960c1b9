#include <catch2/catch.hpp>

#include "discovery/fleet.h"
#include "proxy/admission.h"
#include "proxy/failure_policy.h"
#include "proxy/net.h"
#include "proxy/router.h"

using namespace stepflow;

namespace {

InstancePtr instance(const std::string& id, uint16_t port) {
    HostPort hp{"127.0.0.1", port};
    sockaddr_storage ss;
    socklen_t len;
    numeric_sockaddr(hp, ss, len);
    return std::make_shared<Instance>(id, format_host_port(hp.host, hp.port), ss, len, "");
}

}  // namespace

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

TEST_CASE("limits: the worker's report wins, -32300 cuts, quiet intervals grow it back", "[admission]") {
    auto inst = instance("a", 10001);
    CHECK(inst->limit() == 0);
    CHECK(inst->limit_source() == LimitSource::None);
    inst->base_limit = 8;
    inst->base_source = LimitSource::Flag;
    inst->set_reported_limit(4, LimitSource::Health);
    CHECK(inst->limit() == 4);
    CHECK(inst->limit_source() == LimitSource::Health);
    inst->set_reported_limit(0, LimitSource::Header);  // not a report
    CHECK(inst->limit_source() == LimitSource::Health);

    inst->new_work = 3;
    inst->worker_at_capacity(3, 1000);
    CHECK(inst->limit() == 2);
    CHECK(inst->limit_source() == LimitSource::Learned);
    CHECK_FALSE(inst->has_room());
    CHECK_FALSE(inst->recover_limit(1500, 1000));  // not quiet long enough
    CHECK(inst->recover_limit(2000, 1000));
    CHECK(inst->limit() == 3);
    CHECK(inst->recover_limit(3000, 1000));
    CHECK(inst->limit() == 4);  // back at the reported limit: the learned one is gone
    CHECK(inst->limit_source() == LimitSource::Health);
    CHECK_FALSE(inst->recover_limit(9000, 1000));
}

TEST_CASE("a cut never goes below one", "[admission]") {
    auto inst = instance("a", 10001);
    inst->worker_at_capacity(1, 0);
    CHECK(inst->limit() == 1);
    inst->new_work = 1;
    CHECK_FALSE(inst->try_admit());
    inst->new_work = 0;
    CHECK(inst->try_admit());
    CHECK(inst->new_work == 1);
}

TEST_CASE("least load with need_room skips full instances", "[admission]") {
    auto a = instance("a", 10001), b = instance("b", 10002);
    a->base_limit = 1;
    b->base_limit = 1;
    auto fleet = make_fleet(1, {a, b});
    Rng rng(7);
    a->new_work = 1;
    CHECK(route_least_load(*fleet, rng, {}, true) == b.get());
    b->new_work = 1;
    CHECK(route_least_load(*fleet, rng, {}, true) == nullptr);
    CHECK(route_least_load(*fleet, rng, {}, false) != nullptr);  // pinned-free routing ignores limits
}

TEST_CASE("failure policy: charge and retry per failure", "[admission]") {
    CHECK(judge(Failure::WorkerAtCapacity, Decision::LeastLoad).retriable);
    CHECK_FALSE(judge(Failure::WorkerAtCapacity, Decision::LeastLoad).charge_instance);
    CHECK_FALSE(judge(Failure::QueueTimeout, Decision::LeastLoad).charge_instance);
    CHECK(judge(Failure::ConnectFailed, Decision::LeastLoad).charge_instance);
    CHECK(judge(Failure::StaleConnection, Decision::LeastLoad).retriable);
    CHECK_FALSE(judge(Failure::StaleConnection, Decision::Pinned).retriable);
    CHECK_FALSE(judge(Failure::ResetBeforeResponse, Decision::LeastLoad).retriable);
    CHECK(judge(Failure::ResetBeforeResponse, Decision::Pinned).status == 503);
    CHECK(judge(Failure::HeadTimeout, Decision::LeastLoad).status == 504);
    LocalAnswer a = answer_failure(Failure::QueueFull, Decision::LeastLoad, "7", "", "");
    CHECK(a.status == 503);
    CHECK(a.retry_after);
    CHECK(a.body == R"({"jsonrpc":"2.0","id":7,"error":{"code":-32000,"message":"No capacity available","data":{"reason":"queue-full"}}})");
    a = answer_failure(Failure::ConnectFailed, Decision::Pinned, "\"x\"", "inst-1", "connection refused");
    CHECK(a.body == R"({"jsonrpc":"2.0","id":"x","error":{"code":-32000,"message":"Instance not available","data":{"instanceId":"inst-1","reason":"connect-failed","detail":"connection refused"}}})");
    // A malformed response head is the worker's fault: charged, never retried (issue 22).
    CHECK(judge(Failure::BadResponse, Decision::LeastLoad).charge_instance);
    CHECK_FALSE(judge(Failure::BadResponse, Decision::LeastLoad).retriable);
    CHECK(judge(Failure::BadResponse, Decision::Pinned).status == 502);
    // Two session headers: the client's fault, 400 Invalid Request with its id.
    a = answer_failure(Failure::SessionAmbiguous, Decision::None, "5", "", "");
    CHECK(a.status == 400);
    CHECK_FALSE(judge(Failure::SessionAmbiguous, Decision::None).charge_instance);
    CHECK(a.body == R"({"jsonrpc":"2.0","id":5,"error":{"code":-32600,"message":"More than one session header","data":{"reason":"ambiguous-session"}}})");
}
