// The idle, kept-alive connection to the Kubernetes API server between calls: list pages and the
// watch that follows reuse it instead of paying a TCP and TLS handshake each (HTTP/1.1 keep-alive).
// A connection is parked here only after a response that left it clean; the server may still
// close it while it waits, which the pool notices and forgets, and a call that finds its reused
// connection dead before any answer simply dials again.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

struct bufferevent;

namespace stepflow {

class ApiConnections {
public:
    explicit ApiConnections(std::chrono::milliseconds max_idle = std::chrono::seconds(60)) : max_idle_(max_idle) {}
    ~ApiConnections();
    ApiConnections(const ApiConnections&) = delete;
    ApiConnections& operator=(const ApiConnections&) = delete;

    // An idle connection (now owned by the caller), or null when there is none.
    bufferevent* take();
    // Parks a connection whose last response ended cleanly; at most one is kept.
    void give(bufferevent* bev);
    // Counts for logs and tests: connections dialled, and requests sent on a reused one.
    void note_opened() { ++opened_; }
    void note_reused() { ++reused_; }
    uint64_t opened() const { return opened_; }
    uint64_t reused() const { return reused_; }

private:
    static void on_idle_read(bufferevent* bev, void* arg);
    static void on_idle_event(bufferevent* bev, short what, void* arg);
    void drop(bufferevent* bev);

    std::chrono::milliseconds max_idle_;
    std::vector<bufferevent*> idle_;
    uint64_t opened_ = 0;
    uint64_t reused_ = 0;
};

}  // namespace stepflow
