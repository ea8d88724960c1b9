// Every setting of the balancer, parsed once from flags and environment at start-up.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <sys/time.h>

#include "core/log.h"
#include "core/trace_config.h"

namespace stepflow {

using Millis = std::chrono::milliseconds;

// libevent takes timeouts as timeval.
inline timeval to_timeval(Millis ms) {
    return timeval{static_cast<time_t>(ms.count() / 1000), static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

enum class DiscoveryMode { Static, Dns, Kubernetes };
enum class K8sApi { EndpointSlices, Endpoints };
// How an endpoint becomes a routable instance: a Stepflow /health naming an instanceId, any 2xx
// answer on --health-path, an accepted TCP connection, or no check at all.
enum class HealthCheck { Stepflow, Http, Tcp, Off };
const char* to_string(HealthCheck h);

struct Config {
    // Listeners
    std::string listen = "0.0.0.0:8080";
    std::string admin_listen = "0.0.0.0:9090";
    int threads = 0;  // 0: one per core

    // TLS termination (a second listener beside the plain one)
    std::string tls_listen;
    std::string tls_cert;
    std::string tls_key;

    // HTTP/2 (h2c with prior knowledge on --listen, h2 via ALPN on --tls-listen)
    uint32_t h2_max_concurrent_streams = 100;
    uint32_t h2_initial_window_size = 256 * 1024;
    uint32_t h2_max_header_list_size = 64 * 1024;

    // TLS to workers
    bool upstream_tls = false;
    std::string upstream_ca;   // PEM bundle; default: the system store
    std::string upstream_sni;  // default: the worker's address host
    bool upstream_insecure = false;

    // Discovery
    DiscoveryMode discovery = DiscoveryMode::Static;
    std::vector<std::string> backends;  // static mode
    std::string upstream_service;       // dns mode: host:port
    Millis dns_interval{10000};
    std::string k8s_namespace;
    std::string k8s_service;
    std::string k8s_port_name;
    int k8s_port = 0;
    K8sApi k8s_api = K8sApi::EndpointSlices;
    std::string k8s_api_server;  // URL; default from KUBERNETES_SERVICE_HOST/PORT
    std::string k8s_token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    std::string k8s_ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

    // Health
    Millis health_interval{5000};
    // Checks of a backend that health keeps out of routing (down, rising, not yet answering):
    // a restarted worker returns in about this times --health-rise. Equal to health_interval
    // when --health-interval-down is 0 or not shorter.
    Millis health_interval_down{1000};
    Millis health_timeout{2000};
    int max_failures = 3;
    int health_rise = 2;  // passed checks in a row before an unhealthy instance takes work again
    HealthCheck health_check = HealthCheck::Stepflow;
    std::string health_path = "/health";

    // Routing
    std::string instance_header = "Stepflow-Instance-Id";
    int retry_after_seconds = 1;

    // Admission (docs/admission.md)
    int max_in_flight_per_instance = 0;  // new work per instance; 0 = unlimited unless the worker says
    size_t queue_size = 1024;            // new work waiting for a free slot, across all threads
    Millis queue_timeout{30000};
    int retries = 2;                     // further instances tried for one unpinned request
    size_t retry_buffer_size = 64 * 1024;  // request body kept for replay; larger bodies are not retried
    // A request carrying an Idempotency-Key header may be sent again after a worker may have read
    // it (docs/admission.md), like an idempotent method. Off: only the method counts.
    bool trust_idempotency_key = true;
    Millis capacity_recovery_interval{1000};  // a learned limit grows by one per quiet interval

    // Autoscaling (docs/autoscaling.md)
    // New work arriving while no instance is routable waits this long for one (0: 503 at once).
    Millis cold_start_timeout{30000};
    bool ready_requires_instance = false;  // /ready 503 while no instance takes new work (old meaning)
    std::string scaler_listen;             // KEDA external scaler (gRPC, h2c); empty = off
    std::string peer_service;              // the balancer's own Service: peers summed into demand
    std::string peer_port_name = "metrics";  // its port that reaches the peers' admin listener
    std::vector<std::string> peers;        // static peers' admin addresses (host:port)
    Millis peer_timeout{300};              // a peer slower than this is left out of the sum
    // Sessions learned from response headers (e.g. Mcp-Session-Id); see docs/sessions.md
    std::vector<std::string> session_headers;
    Millis session_idle_timeout{3600000};
    size_t max_sessions = 0;                // 0: from the cgroup memory limit, at most 1,000,000
    std::string session_key_file;           // set: ids are sealed, no table is kept (file or directory of keys)
    std::string session_key_file_previous;  // more keys accepted when unsealing (older form of a rotation)
    Millis session_max_age{0};              // sealed ids older than this are refused; 0 = never
    bool expose_instance = false;  // sealed mode: responses still name the instance (docs/sessions.md)

    // Timeouts (0 = off where noted)
    Millis connect_timeout{2000};
    Millis upstream_header_timeout{300000};
    Millis request_header_timeout{10000};
    Millis keepalive_idle_timeout{60000};
    Millis stream_idle_timeout{0};    // off: an open SSE stream is never cut for being quiet
    // Pooled idle worker connections. Below uvicorn's 5 s keep-alive default, so the worker is
    // not the one closing a connection we are about to reuse.
    Millis upstream_idle_timeout{4000};
    Millis client_send_timeout{60000};
    // A client's request body: the longest gap between its bytes while the balancer would take
    // more (HTTP/1.1 and HTTP/2 streams); 408 when no response has started.
    Millis request_body_timeout{60000};
    // Reading the body of a request we answer ourselves, for its JSON-RPC id; then answered
    // without the id.
    Millis local_body_timeout{5000};
    // Sending the request body to the worker: from the request head's send until the worker's
    // socket has taken the last body byte, whatever moves (a worker taking a byte at a time).
    Millis upstream_request_timeout{300000};
    Millis drain_timeout{30000};

    // Limits
    size_t max_header_size = 64 * 1024;
    int max_headers = 100;
    size_t max_connections = 10000;  // client connections, whole process; more are closed at accept
    size_t max_idle_upstream_per_instance = 256;  // per thread; above the requests a busy HTTP/2 client keeps in flight

    // Logging
    log::Level log_level = log::Level::Info;
    log::Format log_format = log::Format::Json;
    int log_buffer_lines = 10000;  // records queued for stderr before new ones are dropped
    bool access_log = true;
    TraceConfig trace;  // spans and OTLP export (docs/tracing.md)

    // Metrics
    bool compat_metrics = true;  // also export stepflow_lb_request_duration_ms (old dashboards)
};

// Parses argv and the environment. On --help prints usage and exits 0; on bad input prints one
// clear message to stderr and exits 2.
Config parse_config(int argc, char** argv);

// "250ms", "10s", "2m", "1h" or a bare number of seconds ("1", "0.5"). False when malformed.
bool parse_duration(const std::string& text, Millis& out);

}  // namespace stepflow
