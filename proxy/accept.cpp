#include "proxy/accept.h"

#include <cstring>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/bufferevent_ssl.h>

#include "core/config.h"
#include "core/log.h"
#include "core/tls.h"
#include "proxy/client_h1.h"
#include "proxy/client_h2.h"
#include "proxy/conn.h"
#include "proxy/loop_thread.h"

namespace stepflow {
namespace {

constexpr char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
constexpr size_t kPrefaceLen = sizeof kPreface - 1;

}  // namespace

ProtocolSniffer::ProtocolSniffer(LoopThread& thread, Conn* transport, std::string client_ip, bool tls)
    : thread_(thread), transport_(transport), client_ip_(std::move(client_ip)), tls_(tls) {
    transport_->set_callbacks(on_read, nullptr, on_event, this);
    // The first bytes (or the TLS handshake) must come within the request-head time.
    transport_->set_deadline(thread.config().request_header_timeout);
    transport_->enable(EV_READ | EV_WRITE);
}

ProtocolSniffer::~ProtocolSniffer() {
    if (transport_) delete transport_;
}

void ProtocolSniffer::close_now() {
    thread_.connection_closed(this);
    delete this;
}

void ProtocolSniffer::on_read(Conn*, void* arg) {
    auto* self = static_cast<ProtocolSniffer*>(arg);
    if (!self->tls_) self->decide();
}

void ProtocolSniffer::decide() {
    evbuffer* in = transport_->input();
    size_t len = evbuffer_get_length(in);
    size_t n = len < kPrefaceLen ? len : kPrefaceLen;
    if (n == 0) return;
    const char* head = reinterpret_cast<const char*>(evbuffer_pullup(in, static_cast<ssize_t>(n)));
    if (std::memcmp(head, kPreface, n) != 0) return hand_over(false);
    if (n == kPrefaceLen) return hand_over(true);
    // A prefix of the preface so far: wait for more.
}

void ProtocolSniffer::on_event(Conn* transport, short what, void* arg) {
    auto* self = static_cast<ProtocolSniffer*>(arg);
    if ((what & BEV_EVENT_CONNECTED) && self->tls_) {
        SSL* ssl = transport->ssl();
        self->hand_over(negotiated_protocol(ssl) == "h2");
        return;
    }
    if (what & BEV_EVENT_ERROR && self->tls_)
        log::debug("TLS handshake failed", {{"client", self->client_ip_}});
    self->close_now();
}

// A connection that has sent nothing yet is not idle between requests: closing it would fail
// its first request, which the client cannot safely retry (nothing tells it the request was not
// processed). So it waits, within the request-head deadline, and is drained once it speaks.
void ProtocolSniffer::drain() { draining_ = true; }

void ProtocolSniffer::hand_over(bool http2) {
    Conn* transport = transport_;
    transport_ = nullptr;
    transport->set_deadline(Millis(0));
    if (http2) {
        auto* conn = new ClientH2(thread_, transport, client_ip_, tls_);
        thread_.connection_replaced(this, conn);
        if (draining_) conn->drain();  // GOAWAY: the client knows what to retry elsewhere
    } else {
        auto* conn = new ClientH1(thread_, transport, client_ip_, tls_);
        thread_.connection_replaced(this, conn);
        if (draining_) conn->drain();  // its first request is served, then it closes
        conn->start();  // can only defer its own deletion, so `this` is still ours to delete
    }
    delete this;
}

}  // namespace stepflow
