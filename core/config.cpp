#include "core/config.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

// GCC 12 reports a null dereference inside libstdc++'s vector growth as CLI11's header-only
// split() is inlined here (a false positive, the same with any caller): kept out of the build log.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wnull-dereference"
#include <CLI/CLI.hpp>
#pragma GCC diagnostic pop

#include "core/net.h"

namespace stepflow {
namespace {

[[noreturn]] void fail(const std::string& message) {
    std::fprintf(stderr, "stepflow-lb: configuration error: %s\n(see stepflow-lb --help)\n", message.c_str());
    std::exit(2);
}

void duration_flag(const std::string& name, const std::string& text, Millis& out, bool allow_zero) {
    if (text.empty()) return;
    if (!parse_duration(text, out)) fail(name + ": '" + text + "' is not a duration (examples: 250ms, 10s, 2m, 1)");
    if (!allow_zero && out.count() <= 0) fail(name + ": must be greater than zero");
}

std::vector<std::string> split_list(const std::string& s) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= s.size()) {
        size_t comma = s.find(',', start);
        if (comma == std::string::npos) comma = s.size();
        std::string item = s.substr(start, comma - start);
        while (!item.empty() && item.front() == ' ') item.erase(item.begin());
        while (!item.empty() && item.back() == ' ') item.pop_back();
        if (!item.empty()) out.push_back(item);
        start = comma + 1;
    }
    return out;
}

void switch_flag(const std::string& name, const std::string& text, bool& out) {
    if (text == "on" || text == "true" || text == "1") out = true;
    else if (text == "off" || text == "false" || text == "0") out = false;
    else fail(name + ": '" + text + "' is not on or off");
}

bool valid_header_name(const std::string& s) {
    if (s.empty()) return false;
    for (unsigned char c : s)
        if (!(std::isalnum(c) || std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos))
            return false;
    return true;
}

}  // namespace

bool parse_duration(const std::string& text, Millis& out) {
    if (text.empty()) return false;
    size_t pos = 0;
    double value = 0;
    try {
        value = std::stod(text, &pos);
    } catch (...) {
        return false;
    }
    if (!std::isfinite(value) || value < 0 || text[0] == '-' || text[0] == '+' || std::isspace(static_cast<unsigned char>(text[0])))
        return false;
    std::string unit = text.substr(pos);
    double ms;
    if (unit.empty() || unit == "s") ms = value * 1000;
    else if (unit == "ms") ms = value;
    else if (unit == "m") ms = value * 60 * 1000;
    else if (unit == "h") ms = value * 3600 * 1000;
    else return false;
    if (ms > 1e12) return false;
    out = Millis(static_cast<int64_t>(std::llround(ms)));
    return true;
}

const char* to_string(HealthCheck h) {
    switch (h) {
    case HealthCheck::Stepflow: return "stepflow";
    case HealthCheck::Http: return "http";
    case HealthCheck::Tcp: return "tcp";
    case HealthCheck::Off: return "off";
    }
    return "unknown";
}

Config parse_config(int argc, char** argv) {
    Config cfg;
    CLI::App app{"stepflow-lb: an instance-aware load balancer for Stepflow component workers.\n"
                 "Durations take a unit (250ms, 10s, 2m, 1h) or are seconds. Every flag can also be set\n"
                 "through the environment variable shown beside it; a flag wins over its variable."};
    app.set_help_flag("-h,--help", "Print this help and exit");
    app.get_formatter()->column_width(44);
    app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a repeated flag: last wins

    std::string discovery, backends, k8s_api, log_level = "info", log_format = "json", access_log = "on";
    std::string upstream_tls = "off", upstream_insecure = "off", compat_metrics = "on", expose_instance = "off";
    std::string health_interval, health_timeout, connect_timeout, upstream_header_timeout, request_header_timeout,
        keepalive_idle_timeout, stream_idle_timeout, upstream_idle_timeout, client_send_timeout, drain_timeout,
        dns_interval, request_body_timeout, local_body_timeout, upstream_request_timeout, health_check = "stepflow",
        session_idle_timeout, session_max_age, health_interval_down;
    std::vector<std::string> session_headers;

    app.add_option("--listen", cfg.listen, "Proxy listener host:port (port 0 picks a free port)")
        ->envname("BIND_ADDRESS")->capture_default_str();
    app.add_option("--admin-listen", cfg.admin_listen, "Admin listener: /health /ready /metrics /debug/backends")
        ->envname("METRICS_ADDRESS")->capture_default_str();
    app.add_option("--threads", cfg.threads, "Event-loop threads for proxied traffic (0: one per core)")
        ->envname("STEPFLOW_LB_THREADS")->capture_default_str();

    app.add_option("--tls-listen", cfg.tls_listen, "TLS listener host:port (HTTP/1.1 and h2 via ALPN); needs --tls-cert/--tls-key")
        ->envname("STEPFLOW_LB_TLS_LISTEN");
    app.add_option("--tls-cert", cfg.tls_cert, "PEM certificate chain for --tls-listen (reloaded on SIGHUP)")
        ->envname("STEPFLOW_LB_TLS_CERT");
    app.add_option("--tls-key", cfg.tls_key, "PEM private key for --tls-listen (reloaded on SIGHUP)")->envname("STEPFLOW_LB_TLS_KEY");
    app.add_option("--h2-max-concurrent-streams", cfg.h2_max_concurrent_streams,
                   "HTTP/2: streams a client may open at once (more are refused)")
        ->envname("STEPFLOW_LB_H2_MAX_CONCURRENT_STREAMS")->capture_default_str();
    app.add_option("--h2-initial-window-size", cfg.h2_initial_window_size,
                   "HTTP/2: per-stream receive window in bytes (request body buffered per stream)")
        ->envname("STEPFLOW_LB_H2_INITIAL_WINDOW_SIZE")->capture_default_str();
    app.add_option("--h2-max-header-list-size", cfg.h2_max_header_list_size,
                   "HTTP/2: largest header list a client may send, in bytes")
        ->envname("STEPFLOW_LB_H2_MAX_HEADER_LIST_SIZE")->capture_default_str();
    app.add_option("--upstream-tls", upstream_tls, "on|off: speak TLS to workers [off]")->envname("STEPFLOW_LB_UPSTREAM_TLS");
    app.add_option("--upstream-ca", cfg.upstream_ca, "PEM CA bundle that verifies workers (default: system store)")
        ->envname("STEPFLOW_LB_UPSTREAM_CA");
    app.add_option("--upstream-sni", cfg.upstream_sni, "Server name sent to and verified on workers (default: their address)")
        ->envname("STEPFLOW_LB_UPSTREAM_SNI");
    app.add_option("--upstream-insecure", upstream_insecure, "on|off: skip verifying workers' certificates [off]")
        ->envname("STEPFLOW_LB_UPSTREAM_INSECURE");

    app.add_option("--discovery", discovery,
                   "static|dns|kubernetes (default: static with --backends, dns with --upstream-service, "
                   "kubernetes inside a pod)")->envname("STEPFLOW_LB_DISCOVERY");
    app.add_option("--backends", backends, "Static backends: host:port,host:port,...")->envname("STEPFLOW_LB_BACKENDS");
    app.add_option("--upstream-service", cfg.upstream_service, "DNS mode: host:port re-resolved every --dns-interval")
        ->envname("UPSTREAM_SERVICE");
    app.add_option("--dns-interval", dns_interval, "DNS mode: re-resolution interval [10s]")->envname("STEPFLOW_LB_DNS_INTERVAL");
    app.add_option("--namespace", cfg.k8s_namespace, "Kubernetes: worker namespace (default: the service account's)")
        ->envname("STEPFLOW_LB_NAMESPACE");
    app.add_option("--service", cfg.k8s_service, "Kubernetes: worker Service name")->envname("STEPFLOW_LB_SERVICE");
    app.add_option("--port-name", cfg.k8s_port_name, "Kubernetes: EndpointSlice port name to use")
        ->envname("STEPFLOW_LB_WORKER_PORT_NAME");
    app.add_option("--port", cfg.k8s_port, "Kubernetes: EndpointSlice port number to use")->envname("STEPFLOW_LB_WORKER_PORT");
    app.add_option("--k8s-api", k8s_api, "Kubernetes: endpointslices|endpoints [endpointslices]")->envname("STEPFLOW_LB_K8S_API");
    app.add_option("--k8s-api-server", cfg.k8s_api_server,
                   "Kubernetes: API server URL (default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)")
        ->envname("STEPFLOW_LB_K8S_API_SERVER");
    app.add_option("--k8s-token-file", cfg.k8s_token_file, "Kubernetes: bearer token file")
        ->envname("STEPFLOW_LB_K8S_TOKEN_FILE")->capture_default_str();
    app.add_option("--k8s-ca-file", cfg.k8s_ca_file, "Kubernetes: CA bundle for the API server")
        ->envname("STEPFLOW_LB_K8S_CA_FILE")->capture_default_str();

    app.add_option("--health-interval", health_interval, "Active /health check interval [5s]")->envname("HEALTH_CHECK_INTERVAL");
    app.add_option("--health-interval-down", health_interval_down,
                   "/health check interval while an instance is out of routing for its health (0: as "
                   "--health-interval) [1s]")
        ->envname("STEPFLOW_LB_HEALTH_INTERVAL_DOWN");
    app.add_option("--health-timeout", health_timeout,
                   "Active /health check timeout; a check that outlasts the interval delays the next one [2s]")
        ->envname("HEALTH_CHECK_TIMEOUT");
    app.add_option("--health-rise", cfg.health_rise, "Passed /health checks in a row before an unhealthy instance returns")
        ->envname("STEPFLOW_LB_HEALTH_RISE")->capture_default_str();
    app.add_option("--max-failures", cfg.max_failures, "Consecutive failures that make an instance unhealthy")
        ->envname("MAX_FAILURES")->capture_default_str();
    app.add_option("--health-check", health_check,
                   "stepflow|http|tcp|off: stepflow needs a JSON instanceId on --health-path; http takes any 2xx; "
                   "tcp an accepted connection; off routes every discovered endpoint")
        ->envname("STEPFLOW_LB_HEALTH_CHECK")->capture_default_str();
    app.add_option("--health-path", cfg.health_path, "Path the stepflow and http health checks GET")
        ->envname("STEPFLOW_LB_HEALTH_PATH")->capture_default_str();

    app.add_option("--instance-header", cfg.instance_header, "Header that pins a request to an instance")
        ->envname("STEPFLOW_LB_INSTANCE_HEADER")->capture_default_str();
    app.add_option("--retry-after", cfg.retry_after_seconds, "Retry-After seconds on 503 answers")
        ->envname("STEPFLOW_LB_RETRY_AFTER")->capture_default_str();
    app.add_option("--session-header", session_headers,
                   "Response header naming a session (e.g. Mcp-Session-Id); requests carrying it go to the instance "
                   "that minted it. Repeatable; the variable takes a comma-separated list")
        ->envname("STEPFLOW_LB_SESSION_HEADER")->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)->delimiter(',');
    app.add_option("--session-idle-timeout", session_idle_timeout, "Forget a learned session unused this long [1h]")
        ->envname("STEPFLOW_LB_SESSION_IDLE_TIMEOUT");
    app.add_option("--max-sessions", cfg.max_sessions,
                   "Learned sessions kept; the least recently used go first. 0: a quarter of the cgroup memory "
                   "limit at 128 B each, at most 1000000")
        ->envname("STEPFLOW_LB_MAX_SESSIONS")->capture_default_str();
    app.add_option("--session-key-file", cfg.session_key_file,
                   "Keys sealing session ids so every replica routes them without a table: a file with one key "
                   "a line (hex or base64 of 32 bytes; the first seals, all open) or a directory of such files; "
                   "re-read when it changes")
        ->envname("STEPFLOW_LB_SESSION_KEY_FILE");
    app.add_option("--session-max-age", session_max_age, "Refuse sealed session ids issued longer ago than this [off]")
        ->envname("STEPFLOW_LB_SESSION_MAX_AGE");
    app.add_option("--session-key-file-previous", cfg.session_key_file_previous,
                   "The key before --session-key-file: ids it sealed are still accepted (key rotation)")
        ->envname("STEPFLOW_LB_SESSION_KEY_FILE_PREVIOUS");
    app.add_option("--expose-instance", expose_instance,
                   "on|off: with sealed session ids, responses still name the instance that served them "
                   "(the instance header and X-Stepflow-Routed-Instance) [off]")
        ->envname("STEPFLOW_LB_EXPOSE_INSTANCE");

    std::string queue_timeout = "30s", capacity_recovery_interval = "1s";
    app.add_option("--max-in-flight-per-instance", cfg.max_in_flight_per_instance,
                   "New (unpinned) requests one instance runs at once; 0 = unlimited. A capacity the worker "
                   "reports (/health maxConcurrency, endpoint-load-metrics) wins")
        ->envname("STEPFLOW_LB_MAX_IN_FLIGHT_PER_INSTANCE")->capture_default_str();
    app.add_option("--queue-size", cfg.queue_size, "New requests that may wait for a free slot (503 beyond); 0 = no queue")
        ->envname("STEPFLOW_LB_QUEUE_SIZE")->capture_default_str();
    app.add_option("--queue-timeout", queue_timeout, "Longest wait in the queue before 503 [30s]")
        ->envname("STEPFLOW_LB_QUEUE_TIMEOUT");
    app.add_option("--retries", cfg.retries, "Other instances tried for a new request (-32300, stale connection, connect failure)")
        ->envname("STEPFLOW_LB_RETRIES")->capture_default_str();
    app.add_option("--retry-buffer-size", cfg.retry_buffer_size,
                   "Request body bytes kept for replay on retry; larger bodies are streamed and not retried")
        ->envname("STEPFLOW_LB_RETRY_BUFFER_SIZE")->capture_default_str();
    app.add_option("--trust-idempotency-key", cfg.trust_idempotency_key,
                   "Retry a request with an Idempotency-Key header even when the worker may have read it "
                   "(true/false)")
        ->envname("STEPFLOW_LB_TRUST_IDEMPOTENCY_KEY")->capture_default_str();
    app.add_option("--capacity-recovery-interval", capacity_recovery_interval,
                   "Cool-down of a worker refusing with -32300, and the quiet interval after which a learned "
                   "limit doubles [1s]")
        ->envname("STEPFLOW_LB_CAPACITY_RECOVERY_INTERVAL");

    // Autoscaling (docs/autoscaling.md)
    std::string cold_start_timeout = "30s", peer_timeout = "300ms";
    app.add_option("--cold-start-timeout", cold_start_timeout,
                   "Longest wait of new work that arrives while no instance is routable (a fleet at zero "
                   "waking up); 0 = 503 at once [30s]")
        ->envname("STEPFLOW_LB_COLD_START_TIMEOUT");
    app.add_flag("--ready-requires-instance", cfg.ready_requires_instance,
                 "/ready answers 503 while no instance takes new work (the old meaning of /ready)")
        ->envname("STEPFLOW_LB_READY_REQUIRES_INSTANCE");
    app.add_option("--scaler-listen", cfg.scaler_listen,
                   "ip:port of the KEDA external scaler (gRPC over h2c); off when not given")
        ->envname("STEPFLOW_LB_SCALER_LISTEN");
    app.add_option("--peer-service", cfg.peer_service,
                   "The balancer's own Service (same namespace): its replicas' demand is summed for the scaler")
        ->envname("STEPFLOW_LB_PEER_SERVICE");
    app.add_option("--peer-port-name", cfg.peer_port_name,
                   "Port of --peer-service that reaches the replicas' admin listener")
        ->envname("STEPFLOW_LB_PEER_PORT_NAME")->capture_default_str();
    app.add_option("--peers", cfg.peers, "Admin addresses (ip:port) of the other balancer replicas, static discovery")
        ->envname("STEPFLOW_LB_PEERS")->delimiter(',');
    app.add_option("--peer-timeout", peer_timeout, "A peer that has not answered within this is left out of the sum [300ms]")
        ->envname("STEPFLOW_LB_PEER_TIMEOUT");

    app.add_option("--connect-timeout", connect_timeout, "Upstream connect timeout [2s]")->envname("STEPFLOW_LB_CONNECT_TIMEOUT");
    app.add_option("--upstream-header-timeout", upstream_header_timeout,
                   "Time for an upstream to send its response head [5m]")->envname("STEPFLOW_LB_UPSTREAM_HEADER_TIMEOUT");
    app.add_option("--request-header-timeout", request_header_timeout, "Time for a client to send a request head (408 after) [10s]")
        ->envname("STEPFLOW_LB_REQUEST_HEADER_TIMEOUT");
    app.add_option("--keepalive-idle-timeout", keepalive_idle_timeout, "Idle time allowed between client requests [60s]")
        ->envname("STEPFLOW_LB_KEEPALIVE_IDLE_TIMEOUT");
    app.add_option("--stream-idle-timeout", stream_idle_timeout,
                   "Cut a response body (e.g. SSE) silent for this long; 0 = never [0]")->envname("STEPFLOW_LB_STREAM_IDLE_TIMEOUT");
    app.add_option("--upstream-idle-timeout", upstream_idle_timeout, "Close pooled idle worker connections after (keep below the workers' own keep-alive) [4s]")
        ->envname("STEPFLOW_LB_UPSTREAM_IDLE_TIMEOUT");
    app.add_option("--client-send-timeout", client_send_timeout,
                   "Disconnect a client that takes no response bytes for this long while some wait [60s]")
        ->envname("STEPFLOW_LB_CLIENT_SEND_TIMEOUT");
    app.add_option("--request-body-timeout", request_body_timeout,
                   "Longest gap in a client's request body while more is wanted (408 after) [60s]")
        ->envname("STEPFLOW_LB_REQUEST_BODY_TIMEOUT");
    app.add_option("--local-body-timeout", local_body_timeout,
                   "Time to read the body of a locally answered request for its JSON-RPC id [5s]")
        ->envname("STEPFLOW_LB_LOCAL_BODY_TIMEOUT");
    app.add_option("--upstream-request-timeout", upstream_request_timeout,
                   "Time from sending a request head to a worker until it has taken the whole body (504 after) [5m]")
        ->envname("STEPFLOW_LB_UPSTREAM_REQUEST_TIMEOUT");
    app.add_option("--drain-timeout", drain_timeout, "On SIGTERM, time given to requests in flight [30s]")
        ->envname("STEPFLOW_LB_DRAIN_TIMEOUT");

    app.add_option("--max-connections", cfg.max_connections,
                   "Client connections open at once, whole process (more are closed at accept)")
        ->envname("STEPFLOW_LB_MAX_CONNECTIONS")->capture_default_str();
    app.add_option("--max-header-size", cfg.max_header_size, "Largest request head in bytes (431 beyond)")
        ->envname("STEPFLOW_LB_MAX_HEADER_SIZE")->capture_default_str();
    app.add_option("--max-headers", cfg.max_headers, "Most header fields in a request (431 beyond)")
        ->envname("STEPFLOW_LB_MAX_HEADERS")->capture_default_str();

    app.add_option("--compat-metrics", compat_metrics,
                   "on|off: also export stepflow_lb_request_duration_ms for dashboards of the balancer we replace "
                   "(off gives a promtool-clean exposition) [on]")
        ->envname("STEPFLOW_LB_COMPAT_METRICS");
    app.add_option("--log-level", log_level, "trace|debug|info|warn|error")->envname("STEPFLOW_LOG_LEVEL")->capture_default_str();
    app.add_option("--log-format", log_format, "json|text")->envname("STEPFLOW_LOG_FORMAT")->capture_default_str();
    app.add_option("--log-buffer-lines", cfg.log_buffer_lines,
                   "Log records queued for stderr; beyond that, records are dropped and counted")
        ->envname("STEPFLOW_LB_LOG_BUFFER_LINES")->capture_default_str();
    app.add_option("--access-log", access_log, "on|off: one log line per request")->envname("STEPFLOW_LB_ACCESS_LOG")
        ->capture_default_str();

    TraceFlags trace_flags;
    add_trace_flags(app, trace_flags);

    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp&) {
        std::fputs(app.help().c_str(), stdout);
        std::exit(0);
    } catch (const CLI::ParseError& e) {
        fail(e.what());
    }

    HostPort hp;
    if (!log::parse_level(log_level, cfg.log_level)) fail("--log-level: '" + log_level + "' is not one of trace|debug|info|warn|error");
    if (!log::parse_format(log_format, cfg.log_format)) fail("--log-format: '" + log_format + "' is not json or text");
    if (cfg.log_buffer_lines < 16 || cfg.log_buffer_lines > 10000000)
        fail("--log-buffer-lines: must be between 16 and 10000000");
    switch_flag("--access-log", access_log, cfg.access_log);
    if (std::string err = finish_trace_flags(trace_flags, cfg.trace); !err.empty()) fail(err);
    switch_flag("--upstream-tls", upstream_tls, cfg.upstream_tls);
    switch_flag("--upstream-insecure", upstream_insecure, cfg.upstream_insecure);
    switch_flag("--compat-metrics", compat_metrics, cfg.compat_metrics);
    switch_flag("--expose-instance", expose_instance, cfg.expose_instance);
    if (!cfg.tls_listen.empty()) {
        if (!parse_host_port(cfg.tls_listen, hp)) fail("--tls-listen: '" + cfg.tls_listen + "' is not host:port");
        if (cfg.tls_cert.empty() || cfg.tls_key.empty()) fail("--tls-listen needs --tls-cert and --tls-key");
    } else if (!cfg.tls_cert.empty() || !cfg.tls_key.empty()) {
        fail("--tls-cert/--tls-key given without --tls-listen");
    }
    if (cfg.h2_max_concurrent_streams < 1 || cfg.h2_max_concurrent_streams > 10000)
        fail("--h2-max-concurrent-streams: must be between 1 and 10000");
    if (cfg.h2_initial_window_size < 16384 || cfg.h2_initial_window_size > 16 * 1024 * 1024)
        fail("--h2-initial-window-size: must be between 16384 and 16777216");
    if (cfg.h2_max_header_list_size < 1024 || cfg.h2_max_header_list_size > 1024 * 1024)
        fail("--h2-max-header-list-size: must be between 1024 and 1048576");

    duration_flag("--health-interval", health_interval, cfg.health_interval, false);
    duration_flag("--health-timeout", health_timeout, cfg.health_timeout, false);
    duration_flag("--health-interval-down", health_interval_down, cfg.health_interval_down, true);
    if (cfg.health_interval_down.count() > 0 && cfg.health_interval_down.count() < 100)
        fail("--health-interval-down: must be 0 (as --health-interval) or at least 100ms");
    if (cfg.health_interval_down.count() == 0 || cfg.health_interval_down > cfg.health_interval)
        cfg.health_interval_down = cfg.health_interval;
    if (cfg.health_rise < 1 || cfg.health_rise > 1000) fail("--health-rise: must be between 1 and 1000");
    duration_flag("--connect-timeout", connect_timeout, cfg.connect_timeout, false);
    duration_flag("--upstream-header-timeout", upstream_header_timeout, cfg.upstream_header_timeout, false);
    duration_flag("--request-header-timeout", request_header_timeout, cfg.request_header_timeout, false);
    duration_flag("--keepalive-idle-timeout", keepalive_idle_timeout, cfg.keepalive_idle_timeout, false);
    duration_flag("--stream-idle-timeout", stream_idle_timeout, cfg.stream_idle_timeout, true);
    duration_flag("--upstream-idle-timeout", upstream_idle_timeout, cfg.upstream_idle_timeout, false);
    duration_flag("--client-send-timeout", client_send_timeout, cfg.client_send_timeout, false);
    duration_flag("--request-body-timeout", request_body_timeout, cfg.request_body_timeout, false);
    duration_flag("--local-body-timeout", local_body_timeout, cfg.local_body_timeout, false);
    duration_flag("--upstream-request-timeout", upstream_request_timeout, cfg.upstream_request_timeout, false);
    duration_flag("--drain-timeout", drain_timeout, cfg.drain_timeout, true);
    duration_flag("--dns-interval", dns_interval, cfg.dns_interval, false);
    duration_flag("--queue-timeout", queue_timeout, cfg.queue_timeout, false);
    duration_flag("--capacity-recovery-interval", capacity_recovery_interval, cfg.capacity_recovery_interval, false);
    duration_flag("--cold-start-timeout", cold_start_timeout, cfg.cold_start_timeout, true);
    duration_flag("--peer-timeout", peer_timeout, cfg.peer_timeout, false);
    if (!cfg.scaler_listen.empty() && !parse_host_port(cfg.scaler_listen, hp))
        fail("--scaler-listen: '" + cfg.scaler_listen + "' is not host:port");
    for (const auto& peer : cfg.peers)
        if (!parse_host_port(peer, hp)) fail("--peers: '" + peer + "' is not host:port");
    if (!cfg.peer_service.empty() && !cfg.peers.empty()) fail("--peer-service and --peers exclude each other");
    if ((!cfg.peer_service.empty() || !cfg.peers.empty()) && cfg.scaler_listen.empty())
        fail("--peer-service/--peers only serve the external scaler: give --scaler-listen too");
    if (cfg.max_in_flight_per_instance < 0 || cfg.max_in_flight_per_instance > 1000000)
        fail("--max-in-flight-per-instance: must be between 0 and 1000000");
    if (cfg.queue_size > 1000000) fail("--queue-size: must be between 0 and 1000000");
    if (cfg.retries < 0 || cfg.retries > 10) fail("--retries: must be between 0 and 10");
    if (cfg.retry_buffer_size > 64 * 1024 * 1024) fail("--retry-buffer-size: must be at most 67108864 (64 MiB)");
    duration_flag("--session-idle-timeout", session_idle_timeout, cfg.session_idle_timeout, false);
    duration_flag("--session-max-age", session_max_age, cfg.session_max_age, true);

    if (health_check == "stepflow") cfg.health_check = HealthCheck::Stepflow;
    else if (health_check == "http") cfg.health_check = HealthCheck::Http;
    else if (health_check == "tcp") cfg.health_check = HealthCheck::Tcp;
    else if (health_check == "off") cfg.health_check = HealthCheck::Off;
    else fail("--health-check: '" + health_check + "' is not stepflow, http, tcp or off");
    if (cfg.health_path.empty() || cfg.health_path.front() != '/' ||
        cfg.health_path.find_first_of(" \t\r\n") != std::string::npos)
        fail("--health-path: '" + cfg.health_path + "' is not a path starting with /");
    for (auto& h : session_headers) {
        if (h.empty()) continue;
        if (!valid_header_name(h)) fail("--session-header: '" + h + "' is not a header name");
        cfg.session_headers.push_back(h);
    }
    if (cfg.max_sessions > 100000000) fail("--max-sessions: must be between 0 (auto) and 100000000");
    if (!cfg.session_key_file_previous.empty() && cfg.session_key_file.empty())
        fail("--session-key-file-previous needs --session-key-file");
    if (cfg.session_max_age.count() > 0 && cfg.session_key_file.empty())
        fail("--session-max-age needs --session-key-file (only sealed ids carry their issue time)");
    if (cfg.session_max_age.count() > 0 && cfg.session_max_age.count() < 1000)
        fail("--session-max-age: at least 1s (issue times are in seconds)");
    if (!cfg.session_key_file.empty() && cfg.session_headers.empty())
        fail("--session-key-file needs --session-header (the header whose ids are sealed)");

    if (cfg.threads < 0 || cfg.threads > 256) fail("--threads: must be between 0 and 256");
    if (cfg.threads == 0) cfg.threads = std::max(1u, std::thread::hardware_concurrency());
    if (cfg.max_failures < 1 || cfg.max_failures > 1000) fail("--max-failures: must be between 1 and 1000");
    if (cfg.retry_after_seconds < 0 || cfg.retry_after_seconds > 3600) fail("--retry-after: must be between 0 and 3600");
    if (cfg.max_header_size < 1024 || cfg.max_header_size > 1024 * 1024)
        fail("--max-header-size: must be between 1024 and 1048576");
    if (cfg.max_connections < 1 || cfg.max_connections > 10000000) fail("--max-connections: must be between 1 and 10000000");
    if (cfg.max_headers < 8 || cfg.max_headers > 10000) fail("--max-headers: must be between 8 and 10000");
    if (!valid_header_name(cfg.instance_header)) fail("--instance-header: '" + cfg.instance_header + "' is not a header name");

    if (!parse_host_port(cfg.listen, hp)) fail("--listen: '" + cfg.listen + "' is not host:port");
    if (!parse_host_port(cfg.admin_listen, hp)) fail("--admin-listen: '" + cfg.admin_listen + "' is not host:port");

    cfg.backends = split_list(backends);
    for (const auto& b : cfg.backends)
        if (!parse_host_port(b, hp) || hp.port == 0) fail("--backends: '" + b + "' is not host:port");

    if (!k8s_api.empty()) {
        if (k8s_api == "endpointslices") cfg.k8s_api = K8sApi::EndpointSlices;
        else if (k8s_api == "endpoints") cfg.k8s_api = K8sApi::Endpoints;
        else fail("--k8s-api: '" + k8s_api + "' is not endpointslices or endpoints");
    }

    if (discovery.empty()) {
        if (!cfg.backends.empty()) cfg.discovery = DiscoveryMode::Static;
        else if (!cfg.upstream_service.empty()) cfg.discovery = DiscoveryMode::Dns;
        else if (std::getenv("KUBERNETES_SERVICE_HOST")) cfg.discovery = DiscoveryMode::Kubernetes;
        else fail("no backends: give --backends host:port,..., --upstream-service host:port, or run in a pod "
                  "with --service");
    } else if (discovery == "static") {
        cfg.discovery = DiscoveryMode::Static;
    } else if (discovery == "dns") {
        cfg.discovery = DiscoveryMode::Dns;
    } else if (discovery == "kubernetes") {
        cfg.discovery = DiscoveryMode::Kubernetes;
    } else {
        fail("--discovery: '" + discovery + "' is not static, dns or kubernetes");
    }

    switch (cfg.discovery) {
    case DiscoveryMode::Static:
        if (cfg.backends.empty()) fail("--discovery static needs --backends host:port,...");
        break;
    case DiscoveryMode::Dns:
        if (!parse_host_port(cfg.upstream_service, hp) || hp.port == 0)
            fail("--discovery dns needs --upstream-service host:port (got '" + cfg.upstream_service + "')");
        break;
    case DiscoveryMode::Kubernetes:
        if (cfg.k8s_service.empty()) fail("--discovery kubernetes needs --service (the worker Service's name)");
        if (cfg.k8s_port < 0 || cfg.k8s_port > 65535) fail("--port: must be between 1 and 65535");
        if (!cfg.k8s_port_name.empty() && cfg.k8s_port != 0) fail("give --port-name or --port, not both");
        break;
    }
    return cfg;
}

}  // namespace stepflow
