#include "proxy/loop_thread.h"

#include <cerrno>
#include <random>

#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/listener.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/ssl.h>

#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>

#include "core/log.h"
#include "core/net.h"
#include "core/tls.h"
#include "proxy/accept.h"
#include "proxy/admission.h"
#include "proxy/conn.h"
#include "proxy/exchange.h"
#include "proxy/span.h"

namespace stepflow {

LoopThread::LoopThread(int index, const Config& config, const FleetPublisher& publisher, std::vector<Listener> listeners,
               TlsServer* tls_server, TlsClient* tls_client)
    : config_(config), tls_server_(tls_server), tls_client_(tls_client), fleet_(publisher), rng_(std::random_device{}() ^ (uint64_t(index) << 32)),
      series_(index), listener_specs_(std::move(listeners)) {
    // Each loop is touched by its own thread only, so it needs no locks (libevent would take one
    // per event operation otherwise). Other threads reach it through wake_fd_.
    event_config* cfg = event_config_new();
    event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK);
    base_ = event_base_new_with_config(cfg);
    event_config_free(cfg);
    timers_ = std::make_unique<Timers>(base_);
    outbox_ = std::make_unique<Outbox>(base_);
    loop_ = std::make_unique<Loop>(Loop{base_, *timers_, *outbox_});
    pool_ = std::make_unique<UpstreamPool>(*loop_, config_, tls_client_);
    for (const auto& spec : listener_specs_) {
        auto* l = evconnlistener_new(base_, on_accept, this, LEV_OPT_CLOSE_ON_FREE, 0, spec.fd);
        if (l) evconnlistener_set_error_cb(l, on_accept_error);
        listeners_.push_back(l);
    }
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    wake_event_ = event_new(base_, wake_fd_, EV_READ | EV_PERSIST, on_wake, this);
    event_add(wake_event_, nullptr);
    admission_tick_ = event_new(base_, -1, EV_PERSIST, on_admission_tick, this);
    timeval tick{0, 100 * 1000};
    event_add(admission_tick_, &tick);
}

void LoopThread::admit(uint64_t ticket) {
    {
        std::lock_guard lock(handed_over_mutex_);
        handed_over_.push_back(ticket);
    }
    post(kAdmit);
}

void LoopThread::run_admitted() {
    std::vector<uint64_t> tickets;
    {
        std::lock_guard lock(handed_over_mutex_);
        tickets.swap(handed_over_);
    }
    for (uint64_t ticket : tickets) {
        auto it = queued_.find(ticket);
        if (it == queued_.end()) {
            // Its request ended (client gone, timed out) after the ticket was handed over: the
            // slot goes to the next in line instead of being lost.
            AdmissionQueue::get().slot_freed();
            continue;
        }
        Exchange* exchange = it->second;
        queued_.erase(it);
        exchange->slot_offered();
    }
}

// Learned limits grow back with time, and instances join or recover without a request ending,
// so the queue is also offered what room there is a few times a second.
void LoopThread::on_admission_tick(int, short, void* arg) {
    auto* self = static_cast<LoopThread*>(arg);
    int64_t now = steady_ms();
    const Fleet& fleet = self->fleet_.get();  // also lets an idle thread drop instances that left
    const Config& cfg = self->config_;
    // A capacity report not renewed for this long is stale: the flag applies again.
    int64_t report_ttl = std::max(3 * cfg.health_interval.count(), 10 * cfg.capacity_recovery_interval.count());
    for (const auto& inst : fleet.instances) inst->capacity.tick(now, cfg.capacity_recovery_interval.count(), report_ttl);
    AdmissionQueue& queue = AdmissionQueue::get();
    if (queue.depth() == 0) return;
    int room = 0;
    for (const auto& inst : fleet.instances) {
        if (!inst->takes_new_work()) continue;
        int free = inst->capacity.free_slots();
        room += free == InstanceCapacity::kUnlimited ? 1 : free;
        if (room >= 4) break;
    }
    for (int i = 0; i < room && queue.depth() > 0; ++i) queue.slot_freed();
}

LoopThread::~LoopThread() {
    for (auto* conn : connections_.snapshot()) conn->close_now();
    for (auto* l : listeners_)
        if (l) evconnlistener_free(l);
    accept_resume_.cancel();
    pool_.reset();
    loop_.reset();
    outbox_.reset();
    timers_.reset();
    event_free(wake_event_);
    event_free(admission_tick_);
    if (drain_cutoff_) event_free(drain_cutoff_);
    ::close(wake_fd_);
    event_base_free(base_);
}

void LoopThread::start() {
    thread_ = std::thread([this] {
        // The wake event keeps the loop alive while idle; it ends through maybe_exit() or force_stop().
        log::attach_loop(base_);
        trace::attach_loop(base_);
        event_base_dispatch(base_);
        trace::detach_loop();
        log::detach_loop();
    });
}

void LoopThread::join() {
    if (thread_.joinable()) thread_.join();
}

void LoopThread::post(unsigned command) {
    commands_.fetch_or(command);
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

void LoopThread::begin_drain() { post(kDrain); }
void LoopThread::force_stop() { post(kStop); }

void LoopThread::on_wake(int fd, short, void* arg) {
    auto* self = static_cast<LoopThread*>(arg);
    uint64_t count;
    [[maybe_unused]] ssize_t n = ::read(fd, &count, sizeof count);
    unsigned commands = self->commands_.exchange(0);
    if (commands & kStop) return self->stop_now();
    if (commands & kAdmit) self->run_admitted();
    if ((commands & kDrain) && !self->draining_) self->drain_now();
}

namespace {

// Client connections of the whole process (all loops), for --max-connections.
std::atomic<size_t> g_client_connections{0};
constexpr Millis kAcceptPause{100};

}  // namespace

void LoopThread::on_accept(evconnlistener* listener, int fd, sockaddr* addr, int, void* arg) {
    auto* self = static_cast<LoopThread*>(arg);
    if (g_client_connections.fetch_add(1, std::memory_order_relaxed) >= self->config_.max_connections) {
        // Over --max-connections: closed at once, so the client learns it now instead of
        // waiting in the backlog, and what we hold stays bounded.
        g_client_connections.fetch_sub(1, std::memory_order_relaxed);
        evutil_closesocket(fd);
        Metrics::get().connections_refused.Increment();
        auto now = std::chrono::steady_clock::now();
        if (now - self->accept_warned_ > std::chrono::seconds(10)) {
            self->accept_warned_ = now;
            log::warn("connection refused: --max-connections reached",
                      {{"limit", int64_t(self->config_.max_connections)}});
        }
        return;
    }
    // Open from here: a connection still being sniffed for HTTP/1.1 or HTTP/2 counts too.
    Metrics::get().client_connections.Increment();
    std::string ip = format_sockaddr(addr);
    ip = ip.substr(0, ip.rfind(':'));
    if (!ip.empty() && ip.front() == '[') ip = ip.substr(1, ip.size() - 2);
    bool tls = false;
    for (size_t i = 0; i < self->listeners_.size(); ++i)
        if (self->listeners_[i] == listener) tls = self->listener_specs_[i].tls;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    Conn* transport = nullptr;
    if (tls) {
        SSL* ssl = self->tls_server_ ? self->tls_server_->new_connection() : nullptr;
        bufferevent* tls_bev = ssl ? bufferevent_openssl_socket_new(self->base_, fd, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                                                    BEV_OPT_CLOSE_ON_FREE)
                                   : nullptr;
        if (!tls_bev) {
            if (ssl) SSL_free(ssl);
            evutil_closesocket(fd);
            g_client_connections.fetch_sub(1, std::memory_order_relaxed);
            Metrics::get().client_connections.Decrement();
            return;
        }
        transport = Conn::tls(*self->loop_, tls_bev);
    } else {
        transport = Conn::plain(*self->loop_, fd);
    }
    self->connection_opened(new ProtocolSniffer(*self, transport, std::move(ip), tls));
}

void LoopThread::connection_opened(ClientConnection* conn) {
    connections_.add(conn);
    open_connections_.store(connections_.size());
}

// accept() failed. Out of file descriptors (or kernel memory) the pending connection stays in
// the backlog and the listener stays readable: retrying at once would spin the loop at full
// CPU. So accepting pauses for a moment, long enough for connections to close; others wait in
// the backlog meanwhile.
void LoopThread::on_accept_error(evconnlistener*, void* arg) {
    auto* self = static_cast<LoopThread*>(arg);
    int err = EVUTIL_SOCKET_ERROR();
    if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
        log::debug("accept failed", {{"reason", evutil_socket_error_to_string(err)}});
        return;
    }
    auto now = std::chrono::steady_clock::now();
    if (now - self->accept_warned_ > std::chrono::seconds(10)) {
        self->accept_warned_ = now;
        log::warn("accept paused: out of file descriptors or memory",
                  {{"reason", evutil_socket_error_to_string(err)}, {"pause_ms", int64_t(kAcceptPause.count())}});
    }
    Metrics::get().accept_pauses.Increment();
    self->set_accepting(false);
    self->accept_resume_.arm(*self->timers_, kAcceptPause);
}

void LoopThread::on_accept_resume(void* arg) {
    auto* self = static_cast<LoopThread*>(arg);
    if (!self->draining_) self->set_accepting(true);
}

void LoopThread::set_accepting(bool on) {
    for (auto* l : listeners_) {
        if (!l) continue;
        if (on) evconnlistener_enable(l);
        else evconnlistener_disable(l);
    }
}

void LoopThread::connection_replaced(ClientConnection* old_conn, ClientConnection* new_conn) {
    connections_.remove(old_conn);
    connections_.add(new_conn);
}

void LoopThread::connection_closed(ClientConnection* conn) {
    size_t before = connections_.size();
    connections_.remove(conn);
    if (connections_.size() < before) {
        g_client_connections.fetch_sub(1, std::memory_order_relaxed);
        Metrics::get().client_connections.Decrement();
    }
    open_connections_.store(connections_.size());
    if (draining_) maybe_exit();
}

void LoopThread::drain_now() {
    draining_ = true;
    for (auto*& l : listeners_) {
        if (!l) continue;
        // Connections the kernel completed but we have not accepted yet would be reset when the
        // socket closes, failing requests a front already sent on them: take them first.
        int fd = evconnlistener_get_fd(l);
        for (;;) {
            sockaddr_storage addr{};
            socklen_t len = sizeof addr;
            int client = accept4(fd, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (client < 0) break;
            on_accept(l, client, reinterpret_cast<sockaddr*>(&addr), static_cast<int>(len), this);
        }
        evconnlistener_free(l);
        l = nullptr;
    }
    // Queued requests are answered 503 (queue-timeout) a little before the drain timeout would
    // close their connections unanswered.
    Millis margin = std::min(Millis(1000), config_.drain_timeout / 10);
    queue_cutoff_ = std::chrono::steady_clock::now() + config_.drain_timeout - margin;
    drain_cutoff_ = evtimer_new(base_, on_drain_cutoff, this);
    timeval tv{static_cast<time_t>((config_.drain_timeout - margin).count() / 1000),
               static_cast<suseconds_t>((config_.drain_timeout - margin).count() % 1000 * 1000)};
    evtimer_add(drain_cutoff_, &tv);
    drain_begun_.store(true);
    for (auto* conn : connections_.snapshot()) conn->drain();
    maybe_exit();
}

void LoopThread::on_drain_cutoff(int, short, void* arg) {
    auto* self = static_cast<LoopThread*>(arg);
    std::vector<Exchange*> waiting;
    for (auto& [ticket, exchange] : self->queued_) waiting.push_back(exchange);
    for (Exchange* exchange : waiting)
        if (self->queued_waiting(exchange)) exchange->queue_timed_out("draining: no slot freed before --drain-timeout");
}

bool LoopThread::queued_waiting(const Exchange* exchange) const {
    for (const auto& [ticket, e] : queued_)
        if (e == exchange) return true;
    return false;
}

void LoopThread::maybe_exit() {
    if (connections_.empty()) event_base_loopexit(base_, nullptr);
}

void LoopThread::stop_now() {
    for (auto* conn : connections_.snapshot()) conn->close_now();
    event_base_loopexit(base_, nullptr);
}

}  // namespace stepflow
