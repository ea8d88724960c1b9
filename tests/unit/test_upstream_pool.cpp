#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>

#include <event2/event.h>

#include "core/config.h"
#include "core/timers.h"
#include "discovery/instance.h"
#include "proxy/conn.h"
#include "proxy/outbox.h"
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

namespace {

struct NullHandler : UpstreamConn::Handler {
    bool connected = false;
    void upstream_connected() override { connected = true; }
    void upstream_readable() override {}
    void upstream_writable() override {}
    void upstream_closed(UpstreamClose) override {}
};

}  // namespace

TEST_CASE("a pooled connection the worker closed is not reused, even before the loop saw the close") {
    int listener = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&sin), sizeof sin) == 0);
    REQUIRE(::listen(listener, 8) == 0);
    socklen_t len = sizeof sin;
    ::getsockname(listener, reinterpret_cast<sockaddr*>(&sin), &len);
    sockaddr_storage addr{};
    std::memcpy(&addr, &sin, sizeof sin);

    event_base* base = event_base_new();
    {
        Timers timers(base);
        Outbox outbox(base);
        Loop loop{base, timers, outbox};
        Config config;
        UpstreamPool pool(loop, config, nullptr);
        auto inst = std::make_shared<Instance>("w-1", "127.0.0.1:x", addr, socklen_t(sizeof sin), "");
        NullHandler handler;
        auto conn = pool.acquire(inst, &handler);
        REQUIRE(conn);
        for (int i = 0; i < 100 && !handler.connected; ++i) event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        REQUIRE(handler.connected);
        int worker_side = ::accept(listener, nullptr, nullptr);
        REQUIRE(worker_side >= 0);
        int fd = conn->transport()->fd();
        pool.release(std::move(conn));
        int64_t released_us = coarse_now_us();  // not before the pool's own reading
        CHECK(pool.instances_held() == 1);

        SECTION("still open: reused") {
            auto again = pool.acquire(inst, &handler);
            REQUIRE(again);
            CHECK(again->connected());
        }
        SECTION("closed by the worker (the FIN is in the socket, the loop has not run): a fresh one") {
            ::close(worker_side);
            worker_side = -1;
            pollfd p{fd, POLLIN, 0};
            REQUIRE(::poll(&p, 1, 5000) == 1);  // the FIN reached our socket; the loop has not run
            // The kernel is asked only about a connection idle kCheckAfterIdle or more, by the pool's
            // clock (the coarse one, which may lag the precise one by a tick): let it be.
            constexpr int64_t idle_us = std::chrono::microseconds(UpstreamPool::kCheckAfterIdle).count();
            while (coarse_now_us() - released_us < idle_us) ::poll(nullptr, 0, 5);
            auto again = pool.acquire(inst, &handler);
            REQUIRE(again);
            CHECK_FALSE(again->connected());
        }
        if (worker_side >= 0) ::close(worker_side);
    }
    event_base_free(base);
    ::close(listener);
}
