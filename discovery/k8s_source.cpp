#include "discovery/k8s_source.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>

#include <event2/event.h>
#include <openssl/ssl.h>

#include "core/config.h"
#include "core/log.h"
#include "core/net.h"
#include "discovery/discovery_metrics.h"

namespace stepflow {
namespace {

constexpr const char* kNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

bool readable(const std::string& path) { return !path.empty() && std::ifstream(path).good(); }

const char* kind_name(K8sKind k) { return k == K8sKind::EndpointSlices ? "endpointslices" : "endpoints"; }

}  // namespace

bool k8s_settings_from_config(const Config& config, K8sSettings& out, std::string& error) {
    std::string url = config.k8s_api_server;
    if (url.empty()) {
        const char* host = std::getenv("KUBERNETES_SERVICE_HOST");
        const char* port = std::getenv("KUBERNETES_SERVICE_PORT");
        if (!host || !*host) {
            error = "no Kubernetes API server: give --k8s-api-server URL or run in a pod (KUBERNETES_SERVICE_HOST)";
            return false;
        }
        std::string h = host;
        url = "https://" + (h.find(':') != std::string::npos ? "[" + h + "]" : h) + ":" + (port && *port ? port : "443");
    }
    if (!parse_api_server(url, out.api, error)) {
        error = "--k8s-api-server: " + error;
        return false;
    }
    out.ns = config.k8s_namespace;
    if (out.ns.empty()) {
        std::ifstream in(kNamespaceFile);
        std::getline(in, out.ns);
        while (!out.ns.empty() && (out.ns.back() == ' ' || out.ns.back() == '\r')) out.ns.pop_back();
        if (out.ns.empty()) {
            error = std::string("no namespace: give --namespace (") + kNamespaceFile + " is not readable)";
            return false;
        }
    }
    out.service = config.k8s_service;
    out.kind = config.k8s_api == K8sApi::Endpoints ? K8sKind::Endpoints : K8sKind::EndpointSlices;
    out.port = PortSelector{config.k8s_port_name, config.k8s_port};
    out.token_file = config.k8s_token_file;
    out.ca_file = config.k8s_ca_file;
    return true;
}

std::unique_ptr<K8sSource> K8sSource::create(event_base* base, K8sSettings settings, std::string& error) {
    SSL_CTX* tls = nullptr;
    if (settings.api.tls) {
        tls = make_api_tls_context(settings.ca_file, error);
        if (!tls) {
            error += " (--k8s-ca-file)";
            return nullptr;
        }
        if (!readable(settings.token_file)) {
            SSL_CTX_free(tls);
            error = "cannot read the API token file '" + settings.token_file + "' (--k8s-token-file)";
            return nullptr;
        }
    } else if (!readable(settings.token_file)) {
        settings.token_file.clear();  // plain http, as behind `kubectl proxy`: no token needed
    }
    return std::unique_ptr<K8sSource>(new K8sSource(base, std::move(settings), tls));
}

K8sSource::K8sSource(event_base* base, K8sSettings settings, SSL_CTX* tls)
    : base_(base), settings_(std::move(settings)), tls_(tls), token_(settings_.token_file),
      reflector_(store_, settings_.backoff, &metrics_), watch_jitter_(std::random_device{}()) {
    timer_ = evtimer_new(base_, on_timer, this);
}

K8sSource::~K8sSource() {
    call_.reset();
    retired_.reset();
    event_free(timer_);
    if (tls_) SSL_CTX_free(tls_);
}

std::string K8sSource::describe() const {
    return std::string("kubernetes (") + kind_name(settings_.kind) + " " + settings_.ns + "/" + settings_.service + ")";
}

std::string K8sSource::list_path(const std::string& continue_token) const {
    std::string path;
    if (settings_.kind == K8sKind::EndpointSlices)
        path = "/apis/discovery.k8s.io/v1/namespaces/" + settings_.ns + "/endpointslices?labelSelector=" +
               url_encode("kubernetes.io/service-name=" + settings_.service);
    else
        path = "/api/v1/namespaces/" + settings_.ns + "/endpoints?fieldSelector=" +
               url_encode("metadata.name=" + settings_.service);
    path += "&limit=" + std::to_string(settings_.page_limit);
    if (!continue_token.empty()) path += "&continue=" + url_encode(continue_token);
    return path;
}

std::string K8sSource::watch_path(const std::string& resource_version, int timeout_seconds) const {
    std::string path = list_path("");
    path.erase(path.rfind("&limit="));
    return path + "&watch=1&resourceVersion=" + url_encode(resource_version) +
           "&allowWatchBookmarks=true&timeoutSeconds=" + std::to_string(timeout_seconds);
}

void K8sSource::start(EndpointsCallback on_change) {
    on_change_ = std::move(on_change);
    log::info("kubernetes discovery starting",
              {{"api_server", settings_.api.url()}, {"resource", kind_name(settings_.kind)},
               {"namespace", settings_.ns}, {"service", settings_.service}});
    schedule(reflector_.start());
}

void K8sSource::schedule(Reflector::Request request) {
    // The call in flight is abandoned; it may be the very call whose callback we are in, so it
    // is freed on the next turn of the loop rather than here.
    if (call_) retired_ = std::move(call_);
    pending_ = std::move(request);
    log::debug("kubernetes request scheduled",
               {{"kind", pending_.kind == Reflector::Request::Kind::List ? "list" : "watch"},
                {"token", pending_.token}, {"delay_ms", int64_t(pending_.delay.count())}});
    timeval tv = to_timeval(pending_.delay);
    if (retired_ && pending_.delay.count() > 0) tv = timeval{0, 0};  // free it now, send later
    evtimer_add(timer_, &tv);
}

void K8sSource::on_timer(int, short, void* arg) {
    auto* self = static_cast<K8sSource*>(arg);
    if (self->retired_) {
        self->retired_.reset();
        // A backoff wait is still owed when the timer fired early only to free the old call.
        if (self->pending_.delay.count() > 0) {
            timeval tv = to_timeval(self->pending_.delay);
            evtimer_add(self->timer_, &tv);
            self->pending_.delay = std::chrono::milliseconds(0);
            return;
        }
    }
    self->send();
}

void K8sSource::send() {
    uint64_t id = pending_.id;
    const std::string& token = token_.get();
    if (pending_.kind == Reflector::Request::Kind::List) {
        ApiCall::Callbacks cb;
        cb.on_done = [this, id](ApiCall::Outcome o) { on_list_done(id, std::move(o)); };
        call_ = std::make_unique<ApiCall>(base_, settings_.api, tls_, list_path(pending_.token), token,
                                          ApiCall::Mode::Whole, settings_.head_timeout,
                                          std::chrono::milliseconds(30000), std::move(cb), &connections_);
        return;
    }
    ApiCall::Callbacks cb;
    cb.on_open = [this, id] {
        if (id != reflector_.current_id()) return;
        DiscoveryMetrics::get().operation("watch", "success").Increment();
        reflector_.watch_opened(id);
    };
    cb.on_line = [this, id](std::string_view line) { on_watch_line(id, line); };
    cb.on_done = [this, id](ApiCall::Outcome o) { on_watch_done(id, std::move(o)); };
    int base = settings_.watch_timeout_seconds;
    int timeout = base + std::uniform_int_distribution<int>(0, base)(watch_jitter_);
    // Silence longer than the server's own timeout plus a margin means the stream is dead.
    auto idle = std::chrono::milliseconds((timeout + 30) * 1000LL);
    call_ = std::make_unique<ApiCall>(base_, settings_.api, tls_, watch_path(pending_.token, timeout), token,
                                      ApiCall::Mode::Lines, settings_.head_timeout, idle, std::move(cb), &connections_);
}

void K8sSource::follow(std::optional<Reflector::Request> next) {
    if (next) schedule(std::move(*next));
    pacer_.request();
}

void K8sSource::note_api_error(const char* what, const ApiCall::Outcome& o) {
    if (o.status == 401) token_.invalidate();
    std::string reason = o.status ? decode_status_message(parser_, o.body) : o.error;
    log::warn("kubernetes API request failed",
              {{"request", what}, {"status", o.status}, {"reason", reason},
               {"consecutive_failures", reflector_.consecutive_failures() + 1}});
    DiscoveryMetrics::get().operation(what, "error").Increment();
}

void K8sSource::on_list_done(uint64_t id, ApiCall::Outcome o) {
    if (id != reflector_.current_id()) return;
    if (o.status == 200 && o.error.empty()) {
        K8sListPage page;
        std::string error;
        if (decode_list(parser_, o.body, settings_.kind, page, error)) {
            DiscoveryMetrics::get().operation("list", "success").Increment();
            log::debug("kubernetes list page", {{"items", uint64_t(page.items.size())},
                                                {"connections_opened", connections_.opened()},
                                                {"resource_version", page.resource_version},
                                                {"more", !page.continue_token.empty()}});
            return follow(reflector_.list_page(id, std::move(page)));
        }
        o.status = 0;
        o.error = "undecodable list: " + error;
    }
    note_api_error("list", o);
    follow(reflector_.list_failed(id, o.status, o.retry_after));
}

void K8sSource::on_watch_line(uint64_t id, std::string_view line) {
    if (id != reflector_.current_id()) return;
    K8sWatchEvent ev;
    std::string error;
    if (!decode_watch_event(parser_, line, settings_.kind, ev, error)) {
        log::warn("undecodable watch event: relisting", {{"reason", error}});
        return follow(reflector_.watch_garbled(id));
    }
    if (ev.type == K8sWatchEvent::Type::Error)
        log::warn("kubernetes watch error event", {{"code", ev.error_code}, {"reason", ev.message}});
    else
        log::debug("kubernetes watch event", {{"type", to_string(ev.type)}, {"name", ev.object.name},
                                              {"resource_version", ev.object.resource_version}});
    follow(reflector_.watch_event(id, std::move(ev)));
}

void K8sSource::on_watch_done(uint64_t id, ApiCall::Outcome o) {
    if (id != reflector_.current_id()) return;
    if (o.status == 200) {
        bool clean = o.clean && o.error.empty();
        if (!clean) log::info("kubernetes watch stream broke: watching again", {{"reason", o.error}});
        return follow(reflector_.watch_ended(id, clean));
    }
    note_api_error("watch", o);
    follow(reflector_.watch_failed(id, o.status, o.retry_after));
}

void K8sSource::publish() {
    if (!reflector_.take_changed()) return;
    std::vector<Endpoint> endpoints;
    std::string error;
    if (!reflector_.synced()) return;
    if (!store_.endpoints(settings_.port, endpoints, error)) {
        if (!published_) {
            // Start-up: which port to use is a configuration question only the operator can
            // answer. Exit like every other start-up error; nothing has been served yet.
            log::error("cannot start", {{"reason", error}});
            log::flush(std::chrono::seconds(2));  // _Exit skips the log writer: hand it what is queued first
            std::fprintf(stderr, "stepflow-lb: %s\n", error.c_str());
            std::fflush(stderr);
            std::_Exit(2);
        }
        if (error != last_port_error_) log::error("kubernetes endpoints unusable: keeping the last fleet", {{"reason", error}});
        last_port_error_ = error;
        return;
    }
    last_port_error_.clear();
    if (published_ && *published_ == endpoints) return;
    log::info("kubernetes endpoints changed", {{"endpoints", uint64_t(endpoints.size())},
                                               {"objects", uint64_t(store_.object_count())},
                                               {"resource_version", reflector_.resource_version()}});
    published_ = endpoints;
    on_change_(std::move(endpoints));
}

}  // namespace stepflow
