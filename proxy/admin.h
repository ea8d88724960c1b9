// The admin listener (its own port, on the control thread): /health, /ready, /metrics and
// /debug/backends. One request per connection: scrapers and probes do not need keep-alive.
#pragma once

#include <atomic>
#include <string>

#include "discovery/fleet_manager.h"

struct event_base;
struct evconnlistener;
struct bufferevent;

namespace stepflow {

struct Sessions;

class AdminServer {
public:
    AdminServer(event_base* base, int listen_fd, FleetManager& fleet, std::string discovery_name);
    ~AdminServer();

    void set_shutting_down() { shutting_down_ = true; }
    void set_sessions(const Sessions* sessions) { sessions_ = sessions; }
    // --ready-requires-instance: /ready also needs an instance taking new work (the old meaning).
    void set_ready_requires_instance(bool on) { ready_requires_instance_ = on; }
    // Renders one admin response for `method` and `path` (exposed for tests).
    std::string respond(std::string_view method, std::string_view path);

private:
    static void on_accept(evconnlistener*, int fd, sockaddr*, int, void* arg);
    static void on_read(bufferevent* bev, void* arg);
    static void on_write(bufferevent* bev, void* arg);
    static void on_event(bufferevent* bev, short what, void* arg);

    std::string health_body();
    std::string backends_body();

    evconnlistener* listener_ = nullptr;
    FleetManager& fleet_;
    std::string discovery_name_;
    const Sessions* sessions_ = nullptr;
    std::atomic<bool> shutting_down_{false};
    bool ready_requires_instance_ = false;
};

}  // namespace stepflow
