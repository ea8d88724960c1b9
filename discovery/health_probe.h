// Active health checking of one backend: GET /health every interval on a fresh connection, with
// a deadline. The result says whether the worker is healthy and which instanceId it reports.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

#include <sys/socket.h>

#include "core/config.h"
#include "core/http1.h"

struct event_base;
struct event;
struct bufferevent;
struct evbuffer;

namespace stepflow {

class TlsClient;

struct HealthResult {
    bool healthy = false;
    std::string instance_id;  // empty when the body did not name one
    std::string error;        // why it failed
    bool local = false;       // failed on our side (no socket, no memory): not the worker's fault
    bool has_instance_id = false;
    int max_concurrency = 0;  // the worker's own limit on executions ("maxConcurrency"), 0 = not given
    bool config_error = false;  // the backend answers, but not as --health-check expects
    bool refused = false;  // the connect was refused: the host is up, its process not listening
};

// An instanceId is routed on and echoed in response headers: 1 to 253 bytes of visible ASCII
// (no control characters, no spaces). Returns false with the reason otherwise.
bool valid_instance_id(std::string_view id, std::string& why);

// The `stepflow` health mode's rule for the key of a healthy worker: the instanceId its /health
// names, which must be valid. A worker that names none is refused rather than keyed by its
// address: a restart at the same address would otherwise reach a process that lost its sessions.
bool stepflow_instance_id(const HealthResult& result, std::string& id, std::string& why);

// Parses a worker's /health body: {"status":"healthy","instanceId":"..."}.
HealthResult parse_health_body(int status, std::string_view body);
// The verdict on one /health answer under `mode` (stepflow or http): http takes any 2xx.
HealthResult judge_health(HealthCheck mode, int status, std::string_view body);

class HealthProbe {
public:
    using Callback = std::function<void(const HealthResult&)>;

    // With `tls` set (--upstream-tls) the check runs over TLS, as live traffic does.
    HealthProbe(event_base* base, const sockaddr_storage& addr, socklen_t len, std::string host_header,
                std::chrono::milliseconds interval, std::chrono::milliseconds timeout, TlsClient* tls,
                Callback callback);
    ~HealthProbe();
    HealthProbe(const HealthProbe&) = delete;
    HealthProbe& operator=(const HealthProbe&) = delete;

    void start();  // first check at once, then every interval
    bool in_flight() const { return bev_ != nullptr; }
    // The interval from the next tick on. A shorter one also brings the pending tick forward, to
    // `interval` after the last tick (at once if that has passed); a check in flight is kept.
    void set_interval(std::chrono::milliseconds interval);
    std::chrono::milliseconds interval() const { return interval_; }
    // A check now, unless one is in flight; the ticks go on from here.
    void check_now();
    // What to check (default: stepflow on /health). tcp ends a check once connected.
    void set_check(HealthCheck mode, std::string path) {
        mode_ = mode;
        path_ = std::move(path);
    }

private:
    static void on_tick(int, short, void* arg);
    static void on_deadline(int, short, void* arg);
    static void on_read(bufferevent*, void* arg);
    static void on_event(bufferevent*, short what, void* arg);
    void begin_check();
    void try_parse(bool eof);
    void complete(HealthResult result);
    void close_connection();

    event_base* base_;
    sockaddr_storage addr_;
    socklen_t addr_len_;
    std::string host_header_;
    std::chrono::milliseconds interval_, timeout_;
    TlsClient* tls_;
    Callback callback_;
    HealthCheck mode_ = HealthCheck::Stepflow;
    std::string path_ = "/health";
    event* tick_ = nullptr;
    std::chrono::steady_clock::time_point ticked_at_{};  // when the pending tick was armed
    event* deadline_ = nullptr;
    bufferevent* bev_ = nullptr;
    size_t scan_from_ = 0;
    bool head_parsed_ = false;
    http1::Head head_;
    http1::BodyPump body_pump_;
    evbuffer* body_ = nullptr;
};

}  // namespace stepflow
