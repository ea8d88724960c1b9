// DNS discovery, for drop-in use where the balancer we replace ran: a headless Service name
// (--upstream-service host:port, UPSTREAM_SERVICE) re-resolved every --dns-interval. Every
// address is one backend, health-checked like a static one. getaddrinfo blocks, so it runs on a
// thread of its own and posts each answer back to the control loop; the loops never wait on DNS.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>

#include "core/net.h"
#include "discovery/endpoint.h"

struct event_base;
struct event;

namespace stepflow {

// One endpoint per distinct address, ordered, all ready (DNS knows nothing of readiness).
std::vector<Endpoint> dns_endpoints(const std::vector<sockaddr_storage>& addrs);

class DnsSource : public EndpointSource {
public:
    DnsSource(event_base* base, HostPort target, std::chrono::milliseconds interval);
    ~DnsSource() override;
    DnsSource(const DnsSource&) = delete;
    DnsSource& operator=(const DnsSource&) = delete;

    void start(EndpointsCallback on_change) override;
    std::string describe() const override;

private:
    struct Answer {
        bool ok = false;
        std::vector<sockaddr_storage> addrs;
        std::string error;
    };
    void run();                 // the resolver thread
    static void on_answer(int, short, void* arg);  // on the control loop
    void take_answer();

    event_base* base_;
    HostPort target_;
    std::chrono::milliseconds interval_;
    EndpointsCallback on_change_;
    event* notify_ = nullptr;
    std::thread thread_;
    std::mutex mutex_;
    std::condition_variable wake_;
    bool stopping_ = false;
    std::optional<Answer> answer_;  // guarded by mutex_
    std::optional<std::vector<Endpoint>> published_;
};

}  // namespace stepflow
