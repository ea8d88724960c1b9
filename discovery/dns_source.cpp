#include "discovery/dns_source.h"

#include <map>

#include <event2/event.h>

#include "core/log.h"
#include "discovery/discovery_metrics.h"

namespace stepflow {

std::vector<Endpoint> dns_endpoints(const std::vector<sockaddr_storage>& addrs) {
    std::map<std::string, Endpoint> unique;
    for (const auto& a : addrs) {
        std::string address = format_sockaddr(reinterpret_cast<const sockaddr*>(&a));
        unique.try_emplace(address, Endpoint{address, "", true, true, false});
    }
    std::vector<Endpoint> out;
    for (auto& [_, e] : unique) out.push_back(std::move(e));
    return out;
}

DnsSource::DnsSource(event_base* base, HostPort target, std::chrono::milliseconds interval)
    : base_(base), target_(std::move(target)), interval_(interval) {
    // Activated from the resolver thread (libevent is set up for threads in main).
    notify_ = event_new(base_, -1, 0, on_answer, this);
}

DnsSource::~DnsSource() {
    {
        std::lock_guard lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();  // at most one getaddrinfo call away
    event_free(notify_);
}

std::string DnsSource::describe() const { return "dns (" + format_host_port(target_.host, target_.port) + ")"; }

void DnsSource::start(EndpointsCallback on_change) {
    on_change_ = std::move(on_change);
    thread_ = std::thread([this] { run(); });
}

void DnsSource::run() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
        lock.unlock();
        Answer a;
        a.ok = resolve_all(target_, a.addrs, a.error) && !a.addrs.empty();
        if (a.ok) a.error.clear();
        else if (a.error.empty()) a.error = "no addresses";
        lock.lock();
        if (stopping_) break;
        answer_ = std::move(a);
        event_active(notify_, 0, 0);
        wake_.wait_for(lock, interval_, [this] { return stopping_; });
    }
}

void DnsSource::on_answer(int, short, void* arg) { static_cast<DnsSource*>(arg)->take_answer(); }

void DnsSource::take_answer() {
    std::optional<Answer> a;
    {
        std::lock_guard lock(mutex_);
        a.swap(answer_);
    }
    if (!a) return;
    auto name = format_host_port(target_.host, target_.port);
    if (!a->ok) {
        // Keep the last answer: a resolver hiccup must not empty the fleet.
        DiscoveryMetrics::get().operation("resolve", "error").Increment();
        log::warn("DNS resolution failed: keeping the last backends", {{"name", name}, {"reason", a->error}});
        return;
    }
    DiscoveryMetrics::get().operation("resolve", "success").Increment();
    auto endpoints = dns_endpoints(a->addrs);
    if (published_ && *published_ == endpoints) return;
    log::info("DNS backends changed", {{"name", name}, {"addresses", uint64_t(endpoints.size())}});
    published_ = endpoints;
    on_change_(std::move(endpoints));
}

}  // namespace stepflow
