#include "proxy/admin.h"

#include <algorithm>

#include "proxy/admission.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#include "core/http1.h"
#include "proxy/demand.h"
#include "proxy/local_response.h"
#include "proxy/metrics.h"
#include "proxy/sessions.h"

namespace stepflow {
namespace {

constexpr size_t kMaxAdminHead = 16 * 1024;

std::string http_response(int status, std::string_view content_type, const std::string& body) {
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " + http1::status_reason(status) +
                      "\r\nContent-Type: " + std::string(content_type) +
                      "\r\nContent-Length: " + std::to_string(body.size()) +
                      "\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
    out += body;
    return out;
}

struct Counts {
    size_t total = 0, healthy = 0, unhealthy = 0, draining = 0, starting = 0;
};

Counts count(const std::vector<FleetManager::BackendView>& backends) {
    Counts c;
    for (const auto& b : backends) {
        ++c.total;
        if (!b.instance) ++c.starting;
        else if (b.instance->takes_new_work()) ++c.healthy;
        else if (b.instance->takes_pinned_work()) ++c.draining;
        else ++c.unhealthy;
    }
    return c;
}

// Why backends take no work, for a /ready that says 503: the first few are enough to act on.
std::string not_routable_json(const std::vector<FleetManager::BackendView>& backends) {
    std::string out = "[";
    size_t listed = 0;
    for (const auto& b : backends) {
        if (b.routable || listed == 10) continue;
        if (listed++) out += ',';
        out += "{\"address\":" + json_string(b.endpoint.address) + ",\"reason\":" + json_string(b.reason) + "}";
    }
    return out + "]";
}

}  // namespace

AdminServer::AdminServer(event_base* base, int listen_fd, FleetManager& fleet, std::string discovery_name)
    : fleet_(fleet), discovery_name_(std::move(discovery_name)) {
    listener_ = evconnlistener_new(base, on_accept, this, LEV_OPT_CLOSE_ON_FREE, 0, listen_fd);
}

AdminServer::~AdminServer() {
    if (listener_) evconnlistener_free(listener_);
}

void AdminServer::on_accept(evconnlistener* listener, int fd, sockaddr*, int, void* arg) {
    auto* bev = bufferevent_socket_new(evconnlistener_get_base(listener), fd, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(bev, on_read, nullptr, on_event, arg);
    timeval tv{10, 0};
    bufferevent_set_timeouts(bev, &tv, &tv);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

void AdminServer::on_read(bufferevent* bev, void* arg) {
    auto* self = static_cast<AdminServer*>(arg);
    evbuffer* in = bufferevent_get_input(bev);
    size_t scan = 0;
    size_t n = http1::find_head_end(in, kMaxAdminHead, scan);
    if (n == 0) return;
    std::string out;
    if (n == SIZE_MAX) {
        out = http_response(431, "text/plain", "request head too large\n");
    } else {
        http1::Head head;
        head.raw.resize(n);
        evbuffer_remove(in, head.raw.data(), n);
        if (auto err = http1::parse_request(head, {kMaxAdminHead, 100})) {
            out = http_response(err.status, "text/plain", std::string(err.reason) + "\n");
        } else {
            std::string_view path = head.target.substr(0, head.target.find('?'));
            out = self->respond(head.method, path);
        }
    }
    bufferevent_disable(bev, EV_READ);
    bufferevent_setcb(bev, nullptr, on_write, on_event, arg);
    bufferevent_write(bev, out.data(), out.size());
}

void AdminServer::on_write(bufferevent* bev, void*) {
    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0) bufferevent_free(bev);
}

void AdminServer::on_event(bufferevent* bev, short, void*) { bufferevent_free(bev); }

std::string AdminServer::respond(std::string_view method, std::string_view path) {
    if (method != "GET" && method != "HEAD") return http_response(405, "text/plain", "only GET\n");
    if (path == "/health") return http_response(200, "application/json", health_body());
    if (path == "/ready") {
        auto backends = fleet_.backends();
        Counts c = count(backends);
        // Ready means "this balancer can serve": with no routable instance it still holds new work
        // for the fleet to wake up and answers with a JSON-RPC 503 rather than a refused
        // connection (docs/operations.md). The old meaning is one flag away.
        bool synced = fleet_.synced();
        bool ready = !shutting_down_ && synced && (c.healthy > 0 || !ready_requires_instance_);
        std::string body = std::string("{\"ready\":") + (ready ? "true" : "false") +
                           ",\"shuttingDown\":" + (shutting_down_ ? "true" : "false") +
                           ",\"discoverySynced\":" + (synced ? "true" : "false") +
                           ",\"healthyInstances\":" + std::to_string(c.healthy);
        if (c.healthy == 0) body += ",\"notRoutable\":" + not_routable_json(backends);
        body += "}";
        return http_response(ready ? 200 : 503, "application/json", body);
    }
    if (path == "/metrics") {
        FleetPtr fleet = fleet_.fleet();
        SessionMetrics::get().refresh(sessions_);
        DemandSignal::get().refresh(*fleet);
        return http_response(200, "text/plain; version=0.0.4; charset=utf-8",
                             Metrics::get().render(*fleet, fleet_.backend_count()));
    }
    if (path == "/debug/backends") return http_response(200, "application/json", backends_body());
    if (path == "/demand") {
        // This replica's own demand, for the replica answering the autoscaler (proxy/peers.h).
        Demand d = measure_demand(*fleet_.fleet());
        return http_response(200, "application/json",
                             "{\"demand\":" + std::to_string(d.total()) + ",\"queued\":" + std::to_string(d.queued) +
                                 ",\"inFlight\":" + std::to_string(d.in_flight) + "}");
    }
    return http_response(404, "text/plain", "not found: try /health, /ready, /metrics, /debug/backends, /demand\n");
}

std::string AdminServer::health_body() {
    Counts c = count(fleet_.backends());
    return std::string("{\"status\":\"") + (shutting_down_ ? "shutting-down" : "ok") + "\",\"discovery\":" +
           json_string(discovery_name_) + ",\"backends\":{\"total\":" + std::to_string(c.total) +
           ",\"healthy\":" + std::to_string(c.healthy) + ",\"unhealthy\":" + std::to_string(c.unhealthy) +
           ",\"draining\":" + std::to_string(c.draining) + ",\"starting\":" + std::to_string(c.starting) + "}}";
}

std::string AdminServer::backends_body() {
    std::string out = "{\"backends\":[";
    bool first = true;
    for (const auto& b : fleet_.backends()) {
        if (!first) out += ',';
        first = false;
        out += "{\"address\":" + json_string(b.endpoint.address);
        out += ",\"pod\":" + (b.endpoint.pod.empty() ? std::string("null") : json_string(b.endpoint.pod));
        out += ",\"instanceId\":" + (b.instance ? json_string(b.instance->id) : std::string("null"));
        out += ",\"state\":" + json_string(b.state);
        out += ",\"routable\":" + std::string(b.routable ? "true" : "false");
        out += ",\"reason\":" + (b.routable ? std::string("null") : json_string(b.reason));
        out += ",\"ready\":" + std::string(b.endpoint.ready ? "true" : "false");
        out += ",\"serving\":" + std::string(b.endpoint.serving ? "true" : "false");
        out += ",\"terminating\":" + std::string(b.endpoint.terminating ? "true" : "false");
        out += ",\"inFlight\":" + std::to_string(b.instance ? b.instance->in_flight.load() : 0);
        // One view of the capacity, taken at once: its fields agree with each other.
        InstanceCapacity::View cap{};
        if (b.instance) cap = b.instance->capacity.view(steady_ms());
        out += ",\"newWorkInFlight\":" + std::to_string(b.instance ? cap.in_use : 0);
        out += ",\"limit\":" + std::to_string(b.instance ? cap.limit : 0);
        out += ",\"limitSource\":\"" + std::string(b.instance ? to_string(cap.source) : "none") + "\"";
        if (b.instance) {
            // docs/admission.md: cooling (no new work), probing (one slot), recovering (doubling).
            out += ",\"capacity\":{\"state\":\"" + std::string(cap.state) + "\"";
            out += ",\"coolingMs\":" + std::to_string(cap.cooling_ms);
            out += ",\"refusals\":" + std::to_string(cap.refusals);
            out += ",\"flagLimit\":" + std::to_string(cap.flag_limit) + "}";
        }
        out += ",\"consecutiveFailures\":" + std::to_string(b.consecutive_failures);
        out += ",\"lastError\":" + (b.last_error.empty() ? std::string("null") : json_string(b.last_error));
        // The pace of its /health checks now: --health-interval-down while health keeps it out.
        out += ",\"checkIntervalMs\":" + (b.check_interval.count() > 0 ? std::to_string(b.check_interval.count())
                                                                        : std::string("null"));
        out += '}';
    }
    out += "]}";
    return out;
}

}  // namespace stepflow
