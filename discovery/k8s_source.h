// Kubernetes discovery: runs the Reflector's list/watch loop against the API server on the
// control thread's event loop and reports the Service's endpoints whenever they change.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <simdjson.h>

#include "discovery/endpoint.h"
#include "discovery/k8s_client.h"
#include "discovery/k8s_metrics.h"
#include "discovery/k8s_objects.h"
#include "discovery/k8s_slice_store.h"
#include "discovery/publish_pacer.h"
#include "discovery/reflector.h"

struct event_base;
struct event;

namespace stepflow {

struct Config;

struct K8sSettings {
    ApiServer api;
    std::string ca_file;     // https only
    std::string token_file;  // "" or missing: no Authorization header
    std::string ns;
    std::string service;
    K8sKind kind = K8sKind::EndpointSlices;
    PortSelector port;
    // The server ends each watch after 1 to 2 times this, drawn anew for every watch (as
    // client-go does) so that balancer replicas started together do not re-watch together.
    int watch_timeout_seconds = 290;
    int page_limit = 500;
    std::chrono::milliseconds head_timeout{10000};
    Reflector::Options backoff;
};

// Fills `out` from the flags, the pod's environment (KUBERNETES_SERVICE_HOST/PORT) and the
// service-account files. False with a message naming the flag to give when something is missing.
bool k8s_settings_from_config(const Config& config, K8sSettings& out, std::string& error);

class K8sSource : public EndpointSource {
public:
    // Null with `error` set when TLS cannot be set up (CA file) or the token file is unreadable.
    static std::unique_ptr<K8sSource> create(event_base* base, K8sSettings settings, std::string& error);
    ~K8sSource() override;

    void start(EndpointsCallback on_change) override;
    std::string describe() const override;

    // The paths this source asks for (exposed for tests).
    std::string list_path(const std::string& continue_token) const;
    std::string watch_path(const std::string& resource_version, int timeout_seconds) const;

private:
    K8sSource(event_base* base, K8sSettings settings, SSL_CTX* tls);
    static void on_timer(int, short, void* arg);
    void schedule(Reflector::Request request);
    void send();
    void follow(std::optional<Reflector::Request> next);
    void on_list_done(uint64_t id, ApiCall::Outcome outcome);
    void on_watch_line(uint64_t id, std::string_view line);
    void on_watch_done(uint64_t id, ApiCall::Outcome outcome);
    void note_api_error(const char* what, const ApiCall::Outcome& outcome);
    void publish();

    event_base* base_;
    K8sSettings settings_;
    SSL_CTX* tls_;
    TokenSource token_;
    K8sMetrics metrics_;
    SliceStore store_;
    Reflector reflector_;
    simdjson::dom::parser parser_;
    EndpointsCallback on_change_;
    event* timer_ = nullptr;
    Reflector::Request pending_;
    ApiConnections connections_;  // declared before the calls, which may hand theirs back to it
    std::unique_ptr<ApiCall> call_;
    std::unique_ptr<ApiCall> retired_;  // a finished call, freed on the next turn of the loop
    std::optional<std::vector<Endpoint>> published_;
    std::string last_port_error_;
    std::minstd_rand watch_jitter_;
    // Watch events that arrive together (a rolling update touches many slices) are published
    // as one change: each publication rebuilds the endpoint set, O(fleet).
    PublishPacer pacer_{base_, [this] { publish(); }};
};

}  // namespace stepflow
