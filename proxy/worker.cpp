#include "proxy/worker.h"

#include <random>

#include <event2/event.h>
#include <event2/listener.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>

#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>

#include "proxy/accept.h"
#include "proxy/tls.h"
#include "proxy/log.h"
#include "proxy/net.h"

namespace stepflow {

Worker::Worker(int index, const Config& config, const FleetPublisher& publisher, std::vector<Listener> listeners,
               TlsServer* tls_server, TlsClient* tls_client)
    : index_(index), config_(config), tls_server_(tls_server), tls_client_(tls_client), fleet_(publisher), rng_(std::random_device{}() ^ (uint64_t(index) << 32)),
      listener_specs_(std::move(listeners)) {
    base_ = event_base_new();
    pool_ = std::make_unique<UpstreamPool>(base_, config_, tls_client_);
    for (const auto& spec : listener_specs_) {
        auto* l = evconnlistener_new(base_, on_accept, this, LEV_OPT_CLOSE_ON_FREE, 0, spec.fd);
        listeners_.push_back(l);
    }
    drain_event_ = event_new(base_, -1, 0, on_drain, this);
    stop_event_ = event_new(base_, -1, 0, on_force_stop, this);
}

Worker::~Worker() {
    for (auto* conn : std::vector<ClientConnection*>(connections_.begin(), connections_.end())) conn->close_now();
    for (auto* l : listeners_)
        if (l) evconnlistener_free(l);
    pool_.reset();
    event_free(drain_event_);
    event_free(stop_event_);
    event_base_free(base_);
}

void Worker::start() {
    thread_ = std::thread([this] {
        // Keep the loop alive while idle; it ends through maybe_exit() or force_stop().
        event* keepalive = event_new(base_, -1, EV_PERSIST, [](int, short, void*) {}, nullptr);
        timeval day{86400, 0};
        event_add(keepalive, &day);
        event_base_dispatch(base_);
        event_free(keepalive);
    });
}

void Worker::join() {
    if (thread_.joinable()) thread_.join();
}

void Worker::begin_drain() { event_active(drain_event_, 0, 0); }
void Worker::force_stop() { event_active(stop_event_, 0, 0); }

void Worker::on_accept(evconnlistener* listener, int fd, sockaddr* addr, int, void* arg) {
    auto* self = static_cast<Worker*>(arg);
    std::string ip = format_sockaddr(addr);
    ip = ip.substr(0, ip.rfind(':'));
    if (!ip.empty() && ip.front() == '[') ip = ip.substr(1, ip.size() - 2);
    bool tls = false;
    for (size_t i = 0; i < self->listeners_.size(); ++i)
        if (self->listeners_[i] == listener) tls = self->listener_specs_[i].tls;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    bufferevent* bev = nullptr;
    if (tls) {
        SSL* ssl = self->tls_server_ ? self->tls_server_->new_connection() : nullptr;
        if (!ssl) {
            evutil_closesocket(fd);
            return;
        }
        bev = bufferevent_openssl_socket_new(self->base_, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                             BEV_OPT_CLOSE_ON_FREE);
    } else {
        bev = bufferevent_socket_new(self->base_, fd, BEV_OPT_CLOSE_ON_FREE);
    }
    if (!bev) {
        evutil_closesocket(fd);
        return;
    }
    auto* conn = new ProtocolSniffer(*self, bev, std::move(ip), tls);
    self->connections_.insert(conn);
    self->open_connections_.store(self->connections_.size());
}

void Worker::connection_replaced(ClientConnection* old_conn, ClientConnection* new_conn) {
    connections_.erase(old_conn);
    connections_.insert(new_conn);
}

void Worker::connection_closed(ClientConnection* conn) {
    connections_.erase(conn);
    open_connections_.store(connections_.size());
    if (draining_) maybe_exit();
}

void Worker::on_drain(int, short, void* arg) {
    auto* self = static_cast<Worker*>(arg);
    self->draining_ = true;
    for (auto*& l : self->listeners_) {
        if (l) evconnlistener_free(l);
        l = nullptr;
    }
    for (auto* conn : std::vector<ClientConnection*>(self->connections_.begin(), self->connections_.end()))
        conn->drain();
    self->maybe_exit();
}

void Worker::maybe_exit() {
    if (connections_.empty()) event_base_loopexit(base_, nullptr);
}

void Worker::on_force_stop(int, short, void* arg) {
    auto* self = static_cast<Worker*>(arg);
    for (auto* conn : std::vector<ClientConnection*>(self->connections_.begin(), self->connections_.end()))
        conn->close_now();
    event_base_loopexit(self->base_, nullptr);
}

}  // namespace stepflow
