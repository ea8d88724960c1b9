// Connections from one event-loop thread to worker instances, and the keep-alive pool that
// reuses them. Each thread has its own pool, so nothing here is shared between threads.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <unordered_map>
#include <vector>

#include "core/config.h"
#include "discovery/instance.h"

struct event_base;
struct event;

namespace stepflow {

class UpstreamPool;
class TlsClient;
class Conn;
struct Loop;

// How a worker connection ended, as far as the socket can tell.
enum class UpstreamClose {
    ConnectFailed,   // refused, unreachable
    ConnectTimeout,  // --connect-timeout passed
    Timeout,         // no bytes within the read timeout in force
    Eof,             // the worker closed its side
    Reset,           // error on an established connection
};
const char* describe(UpstreamClose how);

// One TCP connection to one instance. While idle it sits in the pool; while in use the owning
// exchange receives its events.
class UpstreamConn {
public:
    struct Handler {
        virtual ~Handler() = default;
        virtual void upstream_connected() = 0;
        virtual void upstream_readable() = 0;
        virtual void upstream_writable() = 0;  // output drained below the low watermark
        virtual void upstream_closed(UpstreamClose how) = 0;
    };

    UpstreamConn(UpstreamPool& pool, InstancePtr instance);
    ~UpstreamConn();
    UpstreamConn(const UpstreamConn&) = delete;
    UpstreamConn& operator=(const UpstreamConn&) = delete;

    bool connect(Millis timeout);
    void attach(Handler* handler) { handler_ = handler; }
    Conn* transport() const { return transport_; }
    Instance& instance() const { return *instance_; }
    const InstancePtr& instance_ptr() const { return instance_; }
    bool connected() const { return connected_; }
    void set_read_timeout(Millis timeout);  // 0 = none

private:
    friend class UpstreamPool;
    static void on_read(Conn*, void* arg);
    static void on_write(Conn*, void* arg);
    static void on_event(Conn*, short what, void* arg);

    UpstreamPool& pool_;
    InstancePtr instance_;
    Conn* transport_ = nullptr;
    Handler* handler_ = nullptr;
    bool connected_ = false;
    int64_t idle_since_us_ = 0;  // when it last went back to the pool
};

class UpstreamPool {
public:
    UpstreamPool(Loop& loop, const Config& config, TlsClient* tls) : loop_(loop), config_(config), tls_(tls) {}
    ~UpstreamPool();

    // A close that arrived during this loop turn is not seen by the loop yet; the kernel is asked
    // (one recv(MSG_PEEK)) before reusing a connection idle this long. Workers close idle
    // keep-alive connections after seconds (uvicorn and Node: 5 s), and under load reuse gaps
    // are far shorter: asking every time would be one system call per request.
    static constexpr std::chrono::milliseconds kCheckAfterIdle{50};

    // An idle connection to `instance` (the most recently used one that shows no pending close or
    // data; see kCheckAfterIdle), or with `fresh` or none left a new one still connecting (handler gets
    // upstream_connected). nullptr when the socket could not even be created.
    std::unique_ptr<UpstreamConn> acquire(const InstancePtr& instance, UpstreamConn::Handler* handler,
                                          bool fresh = false);
    // Closes one idle connection (any instance) to free a descriptor; false when none is idle.
    bool shed_one();
    // Gives a connection whose last exchange ended cleanly back for reuse.
    void release(std::unique_ptr<UpstreamConn> conn);
    // Instances with idle connections kept (never one with none).
    size_t instances_held() const { return idle_.size(); }

private:
    friend class UpstreamConn;
    void drop_idle(UpstreamConn* conn);  // closed or timed out while idle

    Loop& loop_;
    const Config& config_;
    TlsClient* tls_;  // null unless --upstream-tls
    std::unordered_map<Instance*, std::vector<std::unique_ptr<UpstreamConn>>> idle_;
};

}  // namespace stepflow
