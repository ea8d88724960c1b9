// One event-loop thread of the data path: its own listening socket (SO_REUSEPORT), its client
// connections, its upstream pool and its view of the fleet. Threads share nothing but the fleet
// publisher and the instance records' atomics.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/config.h"
#include "core/http1.h"
#include "core/timers.h"
#include "discovery/fleet.h"
#include "proxy/client.h"
#include "proxy/metrics.h"
#include "proxy/outbox.h"
#include "proxy/router.h"
#include "proxy/upstream.h"

struct event_base;
struct evconnlistener;
struct event;

namespace stepflow {

class Exchange;
class TlsServer;
class TlsClient;
struct Sessions;

struct Listener {
    int fd = -1;
    bool tls = false;
};

class LoopThread {
public:
    LoopThread(int index, const Config& config, const FleetPublisher& publisher, std::vector<Listener> listeners,
           TlsServer* tls_server, TlsClient* tls_client);
    ~LoopThread();

    void start();  // runs the loop on a new thread
    void join();
    // From any thread: stop accepting, close idle connections, finish the rest.
    void begin_drain();
    // From any thread, after the drain timeout: close everything and end the loop.
    void force_stop();
    size_t open_connections() const { return open_connections_.load(); }
    // True once the drain began on this thread: the connections waiting in its accept queue are
    // accepted by then, so open_connections() counts them.
    bool drain_begun() const { return drain_begun_.load(); }

    event_base* base() const { return base_; }
    Timers& timers() { return *timers_; }
    const Config& config() const { return config_; }
    FleetView& fleet() { return fleet_; }
    Rng& rng() { return rng_; }
    UpstreamPool& pool() { return *pool_; }
    RequestSeries& series() { return series_; }
    TlsClient* upstream_tls() const { return tls_client_; }
    // Learned or sealed sessions (--session-header); null without. Set before start().
    const Sessions* sessions() const { return sessions_; }
    void set_sessions(const Sessions* sessions) { sessions_ = sessions; }

    // Scratch space for writing and parsing message heads. Each use ends before the call that
    // took it returns, so one per thread serves every connection without an allocation per
    // request. Returned empty.
    std::string& head_text() {
        head_text_.clear();
        return head_text_;
    }
    http1::Head& response_head() {
        response_head_.clear();
        return response_head_;
    }
    std::vector<http1::Header>& header_list() {
        header_list_.clear();
        return header_list_;
    }

    // Admission queue (proxy/admission.h): requests of this thread waiting for a slot, by ticket.
    void wait_for_slot(uint64_t ticket, Exchange* exchange) { queued_[ticket] = exchange; }
    void stop_waiting(uint64_t ticket) { queued_.erase(ticket); }
    // While draining: the latest a queued request may wait, so it is answered 503 before
    // --drain-timeout closes its connection. The far future otherwise.
    std::chrono::steady_clock::time_point queue_cutoff() const { return queue_cutoff_; }
    // Any thread: the queue handed `ticket` a free slot; runs on this thread's loop.
    void admit(uint64_t ticket);

    Loop& loop() { return *loop_; }

    // A new client connection on this thread (accepted, or made by a test harness).
    void connection_opened(ClientConnection* conn);
    void connection_closed(ClientConnection* conn);
    void connection_replaced(ClientConnection* old_conn, ClientConnection* new_conn);

private:
    static void on_accept(evconnlistener*, int fd, sockaddr* addr, int len, void* arg);
    static constexpr unsigned kDrain = 1, kStop = 2, kAdmit = 4;
    static void on_admission_tick(int, short, void* arg);
    void run_admitted();
    static void on_accept_error(evconnlistener*, void* arg);
    static void on_accept_resume(void* arg);
    void set_accepting(bool on);
    void post(unsigned command);  // any thread
    static void on_wake(int fd, short, void* arg);
    void drain_now();
    void stop_now();
    void maybe_exit();

    const Config& config_;
    TlsServer* tls_server_;
    TlsClient* tls_client_;
    const Sessions* sessions_ = nullptr;
    FleetView fleet_;
    Rng rng_;
    event_base* base_ = nullptr;
    std::unique_ptr<Timers> timers_;
    std::unique_ptr<Outbox> outbox_;
    std::unique_ptr<Loop> loop_;  // the two above and base_, for connections
    std::unique_ptr<UpstreamPool> pool_;
    RequestSeries series_;
    std::vector<Listener> listener_specs_;
    std::vector<evconnlistener*> listeners_;
    ConnectionList connections_;
    std::atomic<size_t> open_connections_{0};
    std::atomic<bool> drain_begun_{false};
    Deadline accept_resume_{on_accept_resume, this};  // accepting paused after EMFILE and alike
    std::chrono::steady_clock::time_point accept_warned_{};
    int wake_fd_ = -1;  // eventfd: how other threads wake this loop
    event* wake_event_ = nullptr;
    std::atomic<unsigned> commands_{0};
    bool draining_ = false;
    std::chrono::steady_clock::time_point queue_cutoff_ = std::chrono::steady_clock::time_point::max();
    event* drain_cutoff_ = nullptr;  // answers what is still queued (see queue_cutoff)
    static void on_drain_cutoff(int, short, void* arg);
    bool queued_waiting(const Exchange* exchange) const;
    std::unordered_map<uint64_t, Exchange*> queued_;
    std::mutex handed_over_mutex_;
    std::vector<uint64_t> handed_over_;  // tickets handed over by other threads, under the mutex
    event* admission_tick_ = nullptr;
    std::thread thread_;
    std::string head_text_;
    http1::Head response_head_;
    std::vector<http1::Header> header_list_;
};

}  // namespace stepflow
