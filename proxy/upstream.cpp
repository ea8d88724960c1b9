#include "proxy/upstream.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>
#include <chrono>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include "proxy/conn.h"
#include <event2/event.h>

#include <event2/bufferevent_ssl.h>
#include <openssl/ssl.h>

#include "core/config.h"
#include "core/tls.h"
#include "proxy/metrics.h"

namespace stepflow {
namespace {

// An idle connection is reused only while the worker has neither closed it nor sent anything
// on it: the close may be waiting in the socket, not yet seen by the loop. One recv(MSG_PEEK)
// per reuse after a pause, far cheaper than a call the worker never read, or may have.
bool still_open(Conn* transport, int64_t idle_since_us) {
    if (evbuffer_get_length(transport->input()) != 0) return false;
    int fd = transport->fd();
    if (fd < 0) return true;  // TLS: its reads are the library's; the loop sees a close
    constexpr int64_t check_after_us = std::chrono::microseconds(UpstreamPool::kCheckAfterIdle).count();
    // The coarse clock is plenty against 50 ms, and costs a seventh of a precise read.
    if (coarse_now_us() - idle_since_us < check_after_us) return true;
    char c;
    ssize_t n = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

}  // namespace

const char* describe(UpstreamClose how) {
    switch (how) {
    case UpstreamClose::ConnectFailed: return "connect failed";
    case UpstreamClose::ConnectTimeout: return "connect timeout";
    case UpstreamClose::Timeout: return "upstream timeout";
    case UpstreamClose::Eof: return "upstream closed the connection";
    case UpstreamClose::Reset: return "upstream connection reset";
    }
    return "upstream error";
}

UpstreamConn::UpstreamConn(UpstreamPool& pool, InstancePtr instance) : pool_(pool), instance_(std::move(instance)) {}

UpstreamConn::~UpstreamConn() {
    if (transport_) delete transport_;
}

bool UpstreamConn::connect(Millis timeout) {
    if (pool_.tls_) {
        std::string host = instance_->address.substr(0, instance_->address.rfind(':'));
        if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
        SSL* ssl = pool_.tls_->new_connection(host);
        if (!ssl) return false;
        transport_ = Conn::connect_tls(pool_.loop_, ssl, reinterpret_cast<const sockaddr*>(&instance_->sockaddr),
                                 instance_->sockaddr_len);
    } else {
        transport_ = Conn::connect(pool_.loop_, reinterpret_cast<const sockaddr*>(&instance_->sockaddr),
                             instance_->sockaddr_len);
    }
    if (!transport_) return false;
    transport_->set_callbacks(on_read, on_write, on_event, this);
    // A connect that outlasts its deadline is reported as a timeout event.
    transport_->set_deadline(timeout);
    return true;
}

void UpstreamConn::set_read_timeout(Millis timeout) { transport_->set_idle_timeout(timeout); }

void UpstreamConn::on_read(Conn*, void* arg) {
    auto* self = static_cast<UpstreamConn*>(arg);
    if (self->handler_) {
        self->handler_->upstream_readable();
    } else {
        // Bytes on an idle connection: the worker broke the protocol; do not reuse it.
        self->pool_.drop_idle(self);
    }
}

void UpstreamConn::on_write(Conn*, void* arg) {
    auto* self = static_cast<UpstreamConn*>(arg);
    if (self->handler_) self->handler_->upstream_writable();
}

void UpstreamConn::on_event(Conn* transport, short what, void* arg) {
    auto* self = static_cast<UpstreamConn*>(arg);
    if (what & BEV_EVENT_CONNECTED) {
        self->connected_ = true;
        int one = 1;
        setsockopt(transport->fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        transport->set_deadline(Millis(0));
        if (self->handler_) self->handler_->upstream_connected();
        return;
    }
    if (!self->handler_) {
        self->pool_.drop_idle(self);
        return;
    }
    UpstreamClose how = (what & BEV_EVENT_TIMEOUT) ? (self->connected_ ? UpstreamClose::Timeout : UpstreamClose::ConnectTimeout)
                        : (what & BEV_EVENT_EOF) ? UpstreamClose::Eof
                        : (self->connected_ ? UpstreamClose::Reset : UpstreamClose::ConnectFailed);
    self->handler_->upstream_closed(how);
}

UpstreamPool::~UpstreamPool() = default;

std::unique_ptr<UpstreamConn> UpstreamPool::acquire(const InstancePtr& instance, UpstreamConn::Handler* handler,
                                                   bool fresh) {
    auto it = idle_.find(instance.get());
    while (!fresh && it != idle_.end() && !it->second.empty()) {
        // The most recently used first: the least likely to have met the worker's idle timeout.
        std::unique_ptr<UpstreamConn> conn = std::move(it->second.back());
        it->second.pop_back();
        bool empty = it->second.empty();
        if (empty) idle_.erase(it);
        if (!still_open(conn->transport_, conn->idle_since_us_)) {
            Metrics::get().upstream_idle_closed.Increment();
            if (empty) break;
            continue;  // closed here; try the next
        }
        conn->transport_->set_deadline(Millis(0));
        conn->attach(handler);
        conn->transport_->enable(EV_READ | EV_WRITE);
        return conn;
    }
    auto conn = std::make_unique<UpstreamConn>(*this, instance);
    conn->attach(handler);
    if (!conn->connect(config_.connect_timeout)) return nullptr;
    return conn;
}

bool UpstreamPool::shed_one() {
    auto it = idle_.begin();
    if (it == idle_.end()) return false;
    it->second.erase(it->second.begin());  // its least recently used
    if (it->second.empty()) idle_.erase(it);
    return true;
}

void UpstreamPool::release(std::unique_ptr<UpstreamConn> conn) {
    // An instance that left discovery gets no entry (it would stay behind, empty, for good).
    if (conn->instance_->membership.load(std::memory_order_relaxed) == Membership::Gone) return;  // closes conn
    auto& list = idle_[conn->instance_.get()];
    if (list.size() >= config_.max_idle_upstream_per_instance) return;  // closes conn
    conn->attach(nullptr);
    conn->set_read_timeout(Millis(0));
    // Keep reading while idle so a close by the worker is noticed and the socket dropped.
    conn->transport_->set_watermark(EV_WRITE, 0, 0);
    conn->transport_->enable(EV_READ);
    // Its deadline ends in on_event with no handler, which drops it.
    conn->transport_->set_deadline(config_.upstream_idle_timeout);
    conn->idle_since_us_ = coarse_now_us();
    list.push_back(std::move(conn));
}

void UpstreamPool::drop_idle(UpstreamConn* conn) {
    auto it = idle_.find(conn->instance_.get());
    if (it == idle_.end()) return;
    auto& list = it->second;
    for (auto i = list.begin(); i != list.end(); ++i) {
        if (i->get() == conn) {
            list.erase(i);  // destroys conn
            break;
        }
    }
    if (list.empty()) idle_.erase(it);
}

}  // namespace stepflow
