#include <catch2/catch.hpp>

#include <memory>

#include <event2/event.h>

#include "discovery/instance.h"
#include "proxy/config.h"
#include "proxy/outbox.h"
#include "proxy/timers.h"
#include "proxy/upstream.h"

using namespace stepflow;

TEST_CASE("the upstream pool keeps no entry for an instance that left discovery") {
    event_base* base = event_base_new();
    {
        Timers timers(base);
        Outbox outbox(base);
        Loop loop{base, timers, outbox};
        Config config;
        UpstreamPool pool(loop, config, nullptr);
        sockaddr_storage addr{};
        auto gone = std::make_shared<Instance>("w-1", "127.0.0.1:1", addr, socklen_t(sizeof addr), "");
        gone->membership.store(Membership::Gone);
        // Its last exchange ends after it left: the connection is closed, and nothing of the
        // instance stays in the pool.
        pool.release(std::make_unique<UpstreamConn>(pool, gone));
        CHECK(pool.instances_held() == 0);
    }
    event_base_free(base);
}
