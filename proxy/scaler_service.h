// KEDA's external scaler (gRPC service externalscaler.ExternalScaler, proxy/externalscaler.proto)
// on its own port (--scaler-listen): h2c served with nghttp2, messages encoded with protobuf, no
// gRPC library. IsActive and StreamIsActive say whether any request waits or runs at any replica;
// StreamIsActive pushes `true` the moment a request is held on an empty fleet, which wakes a
// Deployment scaled to zero. GetMetrics answers the demand summed over replicas (proxy/peers.h).
// Control thread. See docs/autoscaling.md.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

struct event_base;
struct event;
struct evconnlistener;
struct sockaddr;

namespace stepflow {

class FleetManager;
class Peers;
struct Config;

class ScalerService {
public:
    ScalerService(event_base* base, int listen_fd, FleetManager& fleet, Peers& peers, const Config& config);
    ~ScalerService();
    ScalerService(const ScalerService&) = delete;
    ScalerService& operator=(const ScalerService&) = delete;

    // Demand here plus at every peer that answers in time; `done` gets the sum.
    void total_demand(std::function<void(uint64_t demand, size_t asked, size_t reached)> done);
    uint64_t local_demand() const;
    // Pushes `active` to every open StreamIsActive whose last answer differs.
    void push_active(bool active);

    struct Connection;

private:
    static void on_accept(evconnlistener*, int fd, ::sockaddr*, int, void* arg);
    static void on_wake(int, short, void* arg);
    static void on_tick(int, short, void* arg);

    event_base* base_;
    FleetManager& fleet_;
    Peers& peers_;
    const Config& config_;
    evconnlistener* listener_ = nullptr;
    event* wake_ = nullptr;
    event* tick_ = nullptr;
    bool polling_ = false;     // a tick's peer poll is under way
    size_t last_reached_ = SIZE_MAX;
    std::set<std::shared_ptr<Connection>> connections_;
    friend struct Connection;
};

}  // namespace stepflow
