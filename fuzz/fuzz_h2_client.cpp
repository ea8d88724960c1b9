// The HTTP/2 client side: bytes from a "client" go over a socket pair into a real ClientH2 session
// run by a worker's libevent loop, so what is fuzzed is our nghttp2 callbacks, stream bookkeeping,
// request checks, flow control and local answers (the fleet is empty: every request is answered
// by the balancer itself). The harness sends the connection preface; the first input byte sets
// how many bytes each read carries (the loop runs between reads), the rest are frames.
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>

#include <event2/event.h>

#include "core/config.h"
#include "core/log.h"
#include "discovery/fleet.h"
#include "proxy/client_h2.h"
#include "proxy/conn.h"
#include "proxy/loop_thread.h"

using namespace stepflow;

namespace {

struct Harness {
    Config config;
    FleetPublisher publisher;
    std::unique_ptr<LoopThread> thread;
    Harness() {
        config.access_log = false;
        log::configure(log::Level::Error, log::Format::Json);
        thread = std::make_unique<LoopThread>(0, config, publisher, std::vector<Listener>{}, nullptr, nullptr);
    }
};

// Runs the loop's ready callbacks once and throws away what the server wrote.
void turn(Harness& h, int peer) {
    event_base_loop(h.thread->base(), EVLOOP_NONBLOCK);
    char sink[16384];
    while (::read(peer, sink, sizeof sink) > 0) {
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static Harness* harness = new Harness;  // lives for the process, like a loop thread
    if (size == 0) return 0;
    size_t step = (size_t(data[0]) + 1) * 8;
    ++data;
    --size;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) return 0;
    LoopThread& thread = *harness->thread;
    auto* client = new ClientH2(thread, Conn::plain(thread.loop(), sv[0]), "127.0.0.1", false);
    thread.connection_opened(client);

    static const char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    [[maybe_unused]] ssize_t w = ::write(sv[1], kPreface, sizeof kPreface - 1);
    for (size_t at = 0; at < size && thread.open_connections() > 0;) {
        size_t n = size - at < step ? size - at : step;
        ssize_t put = ::write(sv[1], data + at, n);
        if (put < 0 && errno != EAGAIN) break;
        if (put > 0) at += size_t(put);
        turn(*harness, sv[1]);
    }
    // The client says no more; give the session a few turns to answer and close by itself.
    ::shutdown(sv[1], SHUT_WR);
    for (int i = 0; i < 16 && thread.open_connections() > 0; ++i) turn(*harness, sv[1]);
    if (thread.open_connections() > 0) client->close_now();
    ::close(sv[1]);
    return 0;
}
