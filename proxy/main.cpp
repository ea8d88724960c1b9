// stepflow-lb: wiring. The control thread runs discovery, health checks and the admin listener;
// N loop threads run the data path. See docs/architecture.md.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include <event2/event.h>
#include <event2/thread.h>
#include <unistd.h>

#include "core/config.h"
#include "core/log.h"
#include "core/net.h"
#include "core/tls.h"
#include "discovery/fleet_manager.h"
#include "discovery/sources.h"
#include "proxy/admin.h"
#include "proxy/admission.h"
#include "proxy/block_cache.h"
#include "proxy/demand.h"
#include "proxy/metrics.h"
#include "proxy/otlp_exporter.h"
#include "proxy/peers.h"
#include "proxy/scaler_service.h"
#include "proxy/sessions.h"
#include "proxy/loop_thread.h"

using namespace stepflow;

namespace {

[[noreturn]] void startup_error(const std::string& message) {
    log::error("cannot start", {{"reason", message}});
    log::flush(std::chrono::seconds(2));
    std::fprintf(stderr, "stepflow-lb: %s\n", message.c_str());
    std::exit(2);
}

// Opens one SO_REUSEPORT socket per thread on `spec`. With port 0 the first socket picks the
// port and the others join it, so tests can ask for a free port without a race.
std::vector<int> open_listeners(const std::string& spec, int count, std::string& bound) {
    HostPort hp;
    sockaddr_storage addr;
    socklen_t len;
    if (!parse_host_port(spec, hp) || !numeric_sockaddr(hp, addr, len))
        startup_error("'" + spec + "' is not a numeric ip:port to listen on");
    std::vector<int> fds;
    for (int i = 0; i < count; ++i) {
        std::string error;
        int fd = open_listener(addr, len, true, error);
        if (fd < 0) startup_error("cannot listen on " + spec + ": " + error);
        if (i == 0) {
            sockaddr_storage actual;
            socklen_t actual_len = sizeof actual;
            getsockname(fd, reinterpret_cast<sockaddr*>(&actual), &actual_len);
            addr = actual;
            bound = format_sockaddr(reinterpret_cast<sockaddr*>(&actual));
        }
        fds.push_back(fd);
    }
    return fds;
}

struct Shutdown {
    event_base* base;
    AdminServer* admin;
    std::vector<std::unique_ptr<LoopThread>>* workers;
    const Config* config;
    event* poll = nullptr;
    std::chrono::steady_clock::time_point deadline;
    bool started = false;
};

void on_shutdown_poll(int, short, void* arg) {
    auto* s = static_cast<Shutdown*>(arg);
    size_t open = 0;
    bool begun = true;
    for (auto& w : *s->workers) {
        open += w->open_connections();
        begun = begun && w->drain_begun();
    }
    // Not drained before every thread has taken the connections waiting in its accept queue:
    // until then a count of 0 misses them, and exiting would leave their requests unanswered.
    if (open == 0 && begun) {
        log::info("drained: exiting");
        event_base_loopexit(s->base, nullptr);
        return;
    }
    if (std::chrono::steady_clock::now() >= s->deadline) {
        log::warn("drain timeout: closing remaining connections", {{"connections", uint64_t(open)}});
        for (auto& w : *s->workers) w->force_stop();
        event_base_loopexit(s->base, nullptr);
        return;
    }
    timeval tv{0, 50 * 1000};
    evtimer_add(s->poll, &tv);
}

struct Reloadable {
    TlsServer* tls;
    Sessions* sessions;
};

// SIGHUP: the TLS certificate and the session keys are read again (the keys also on change).
void on_reload(int, short, void* arg) {
    auto* r = static_cast<Reloadable*>(arg);
    if (r->sessions) r->sessions->reload_keys();
    if (!r->tls) return;
    std::string error;
    if (r->tls->reload(error)) log::info("TLS certificate reloaded");
    else log::error("TLS certificate reload failed: keeping the previous one", {{"reason", error}});
}

void on_signal(int sig, short, void* arg) {
    auto* s = static_cast<Shutdown*>(arg);
    if (s->started) {
        log::warn("second signal: exiting now");
        for (auto& w : *s->workers) w->force_stop();
        event_base_loopexit(s->base, nullptr);
        return;
    }
    s->started = true;
    log::info("shutting down: draining", {{"signal", sig}, {"drain_timeout_ms", int64_t(s->config->drain_timeout.count())}});
    s->admin->set_shutting_down();
    for (auto& w : *s->workers) w->begin_drain();
    s->deadline = std::chrono::steady_clock::now() + s->config->drain_timeout;
    s->poll = evtimer_new(s->base, on_shutdown_poll, s);
    timeval tv{0, 0};
    evtimer_add(s->poll, &tv);
}

}  // namespace

int main(int argc, char** argv) {
    // libevent's own blocks (buffer chains above all: a few per request) come from the per-thread
    // block cache too; this must come before any other libevent call.
    event_set_mem_functions(block_alloc, block_realloc, block_free);
    Config config = parse_config(argc, argv);
    AdmissionQueue::get().configure(config.queue_size);
    log::configure(config.log_level, config.log_format);
    log::set_buffer_lines(config.log_buffer_lines);
    MetricsRegistry::get().set_compat_metrics(config.compat_metrics);
    MetricsRegistry::get().set_request_threads(config.threads);
    Metrics::get();  // the data path's families, before discovery can add any
    trace::configure(config.trace.sampling);
    if (config.trace.sampling.enabled) otlp_exporter::start(config.trace.exporter);
    std::signal(SIGPIPE, SIG_IGN);
    evthread_use_pthreads();

    event_base* control = event_base_new();
    std::string error;
    auto source = make_endpoint_source(config, control, error);
    if (!source) startup_error(error);

    std::unique_ptr<TlsServer> tls_server;
    if (!config.tls_listen.empty()) {
        tls_server = std::make_unique<TlsServer>();
        if (!tls_server->load(config.tls_cert, config.tls_key, error)) startup_error("--tls-cert/--tls-key: " + error);
    }
    std::unique_ptr<TlsClient> tls_client;
    if (config.upstream_tls) {
        tls_client = std::make_unique<TlsClient>();
        if (!tls_client->init(config, error)) startup_error(error);
    }

    bool sessions_failed = false;
    std::unique_ptr<Sessions> sessions = Sessions::from_config(config, error, sessions_failed);
    if (sessions_failed) startup_error(error);
    SessionMetrics::get();  // every session series exists from the first scrape
    DemandSignal::get();    // and every demand series

    std::string proxy_bound, admin_bound, tls_bound;
    std::vector<int> proxy_fds = open_listeners(config.listen, config.threads, proxy_bound);
    std::vector<int> tls_fds;
    if (tls_server) tls_fds = open_listeners(config.tls_listen, config.threads, tls_bound);
    std::vector<int> admin_fds = open_listeners(config.admin_listen, 1, admin_bound);
    std::string scaler_bound;
    std::vector<int> scaler_fds;
    if (!config.scaler_listen.empty()) scaler_fds = open_listeners(config.scaler_listen, 1, scaler_bound);

    FleetPublisher publisher;
    FleetManager fleet(control, config, publisher, tls_client.get());
    fleet.on_routable(offer_queued_work);
    AdminServer admin(control, admin_fds[0], fleet, source->describe());
    admin.set_sessions(sessions.get());
    admin.set_ready_requires_instance(config.ready_requires_instance);
    std::unique_ptr<Peers> peers;
    std::unique_ptr<ScalerService> scaler;
    if (!scaler_fds.empty()) {
        peers = std::make_unique<Peers>(control, config);
        if (!peers->start(error)) startup_error("--peer-service: " + error);
        scaler = std::make_unique<ScalerService>(control, scaler_fds[0], fleet, *peers, config);
    }

    std::vector<std::unique_ptr<LoopThread>> workers;
    for (int i = 0; i < config.threads; ++i) {
        std::vector<Listener> listeners{{proxy_fds[size_t(i)], false}};
        if (tls_server) listeners.push_back({tls_fds[size_t(i)], true});
        workers.push_back(
            std::make_unique<LoopThread>(i, config, publisher, std::move(listeners), tls_server.get(), tls_client.get()));
        workers.back()->set_sessions(sessions.get());
    }

    Shutdown shutdown{control, &admin, &workers, &config, nullptr, {}, false};
    event* sigterm = evsignal_new(control, SIGTERM, on_signal, &shutdown);
    event* sigint = evsignal_new(control, SIGINT, on_signal, &shutdown);
    Reloadable reloadable{tls_server.get(), sessions.get()};
    event* sighup = evsignal_new(control, SIGHUP, on_reload, &reloadable);
    event_add(sigterm, nullptr);
    event_add(sigint, nullptr);
    if (sessions) sessions->watch_keys(control);
    if (tls_server || (sessions && sessions->sealer)) event_add(sighup, nullptr);
    else std::signal(SIGHUP, SIG_IGN);

    source->start([&fleet](std::vector<Endpoint> endpoints) { fleet.update(std::move(endpoints)); });
    for (auto& w : workers) w->start();
    log::info("listening", {{"proxy", proxy_bound}, {"tls", tls_bound}, {"admin", admin_bound}, {"scaler", scaler_bound}, {"threads", config.threads},
                            {"discovery", source->describe()}, {"pid", int64_t(getpid())}});

    if (config.trace.sampling.enabled) {
        const auto& t = config.trace.exporter.target;
        log::info("exporting spans", {{"endpoint", std::string(t.tls ? "https://" : "http://") + t.host + ":" + std::to_string(t.port) + t.path},
                                      {"protocol", t.protocol == OtlpTarget::Protocol::Grpc ? "grpc" : "http/protobuf"},
                                      {"sampler", trace::to_string(config.trace.sampling.sampler)}});
        if (config.trace.compression_asked)
            log::warn("OTLP compression gzip is not supported: spans are exported uncompressed",
                      {{"setting", "OTEL_EXPORTER_OTLP_COMPRESSION"}});
    }

    // The control loop's records (discovery, health) also leave once per loop turn.
    log::attach_loop(control);
    event_base_dispatch(control);
    log::detach_loop();

    for (auto& w : workers) w->join();
    workers.clear();
    // The loops handed over their last spans as they ended: send them, bounded like the drain.
    otlp_exporter::shutdown(std::min<std::chrono::milliseconds>(config.drain_timeout, std::chrono::seconds(5)) +
                            std::chrono::seconds(1));
    event_free(sigterm);
    event_free(sigint);
    event_free(sighup);
    if (shutdown.poll) event_free(shutdown.poll);
    source.reset();
    log::info("stopped");
    log::flush(std::chrono::seconds(2));  // bounded: a sink nobody reads cannot hold the exit
    return 0;
}
