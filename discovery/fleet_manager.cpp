#include "discovery/fleet_manager.h"

#include <algorithm>
#include <chrono>
#include <set>

#include <event2/event.h>

#include "core/log.h"
#include "core/metrics_registry.h"
#include "core/net.h"
#include "discovery/discovery_metrics.h"

namespace stepflow {
namespace {

// How often a backend that refuses connections within kRestartWindow of its last passed check
// is checked (see pace_checks).
constexpr std::chrono::milliseconds kRestartRecheck{100};
constexpr std::chrono::seconds kRestartWindow{30};

// The clock of capacity reports (steady, in ms), as the request threads read it.
int64_t now_ms() {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

}  // namespace

FleetManager::FleetManager(event_base* base, const Config& config, FleetPublisher& publisher, TlsClient* tls)
    : base_(base), config_(config), publisher_(publisher), tls_(tls) {
    if (config_.health_check == HealthCheck::Off || config_.health_interval_down >= config_.health_interval) return;
    takeout_watch_ = event_new(base_, -1, EV_PERSIST, on_takeout_watch, this);
    timeval every = to_timeval(config_.health_interval_down);
    event_add(takeout_watch_, &every);
}

FleetManager::~FleetManager() {
    if (takeout_watch_) event_free(takeout_watch_);
}

void FleetManager::pace_checks(Backend& b) {
    if (!b.probe) return;
    bool out_for_health = !b.instance || !b.instance->healthy.load(std::memory_order_relaxed);
    // A routable instance whose last check failed is checked at the down pace too (HAProxy's
    // fastinter): a worker that stopped answering /health goes out after --max-failures down
    // intervals, not --max-failures full ones, and one blip costs one quick re-check.
    bool failing = b.instance && b.instance->check_failures.load(std::memory_order_relaxed) > 0;
    auto pace = out_for_health || failing ? config_.health_interval_down : config_.health_interval;
    // A refused connect soon after the backend last passed: its host is up and its process is
    // not listening, as while a container restarts. Such a check is one round trip, so it runs
    // often and the worker takes work again about as soon as it listens; the window keeps
    // backends that never come back (or never passed) at the down interval.
    if (out_for_health && b.refusing && pace < config_.health_interval &&
        std::chrono::steady_clock::now() - b.last_passed < kRestartWindow)
        pace = std::min(pace, kRestartRecheck);
    b.probe->set_interval(pace);
}

void FleetManager::on_takeout_watch(int, short, void* arg) {
    auto* self = static_cast<FleetManager*>(arg);
    for (auto& [_, b] : self->backends_) {
        if (!b->probe || !b->instance || b->instance->healthy.load(std::memory_order_relaxed) ||
            b->probe->interval() == self->config_.health_interval_down)
            continue;
        self->pace_checks(*b);
        b->probe->check_now();  // within one down interval of the take-out, not the rest of a long tick
    }
}

Membership FleetManager::membership_of(const Endpoint& e) {
    if (e.ready && !e.terminating) return Membership::Active;
    if (e.serving) return Membership::Draining;
    return Membership::NotServing;
}

void FleetManager::update(std::vector<Endpoint> endpoints) {
    DiscoveryMetrics::get().operation("update", "success").Increment();
    synced_ = true;
    bool changed = false;
    std::set<std::string> seen;
    for (auto& e : endpoints) {
        if (!seen.insert(e.address).second) continue;  // the same address twice: first one wins
        auto it = backends_.find(e.address);
        if (it != backends_.end()) {
            Backend& b = *it->second;
            if (b.endpoint == e) continue;
            Membership before = membership_of(b.endpoint), after = membership_of(e);
            bool new_pod = b.endpoint.pod != e.pod;
            b.endpoint = e;
            if (new_pod && b.instance && config_.health_check != HealthCheck::Stepflow) {
                // The id comes from the pod name: a new pod at the same address is a new instance.
                adopt_instance(b, id_for(b, {}));
                changed = true;
                continue;
            }
            if (before != after) {
                // Read live by routing: no new snapshot needed.
                log::info("backend state changed", {{"backend", e.address}, {"pod", e.pod}, {"state", to_string(after)}});
                if (b.instance) b.instance->membership.store(after);
                if (b.instance && after == Membership::Active) notify_routable();
            }
            continue;
        }
        HostPort hp;
        auto b = std::make_unique<Backend>();
        if (!parse_host_port(e.address, hp) || !numeric_sockaddr(hp, b->addr, b->addr_len)) {
            log::warn("ignoring endpoint with a non-numeric address", {{"backend", e.address}});
            continue;
        }
        b->endpoint = e;
        log::info("backend added", {{"backend", e.address}, {"pod", e.pod}, {"state", to_string(membership_of(e))}});
        Backend& added = *backends_.emplace(e.address, std::move(b)).first->second;
        start_checking(added);
        changed = true;
    }
    for (auto it = backends_.begin(); it != backends_.end();) {
        if (seen.count(it->first)) {
            ++it;
            continue;
        }
        Backend& b = *it->second;
        log::info("backend removed", {{"backend", b.endpoint.address}, {"pod", b.endpoint.pod},
                                      {"instance", b.instance ? b.instance->id : std::string()}});
        if (b.instance) {
            b.instance->membership.store(Membership::Gone);
            changed = true;
        }
        // Its request series go now, not when the last request or snapshot naming it ends.
        MetricsRegistry::get().retire_backend(b.endpoint.address);
        it = backends_.erase(it);
    }
    if (changed) publish();
}

// With --health-check off the endpoint is an instance at once; otherwise a probe decides.
void FleetManager::start_checking(Backend& b) {
    if (config_.health_check == HealthCheck::Off) {
        adopt_instance(b, id_for(b, {}));
        return;
    }
    Backend* raw = &b;
    b.probe = std::make_unique<HealthProbe>(base_, b.addr, b.addr_len, b.endpoint.address, config_.health_interval,
                                            config_.health_timeout, tls_,
                                            [this, raw](const HealthResult& r) {
                                                on_health(*raw, r);
                                                pace_checks(*raw);
                                            });
    b.probe->set_check(config_.health_check, config_.health_path);
    b.probe->start();
}

// Stepflow workers name themselves; any other backend is known by its pod name, or its address
// when discovery gives no pod (static and DNS discovery).
std::string FleetManager::id_for(const Backend& b, const HealthResult& r) const {
    if (config_.health_check == HealthCheck::Stepflow && !r.instance_id.empty()) return r.instance_id;
    return b.endpoint.pod.empty() ? b.endpoint.address : b.endpoint.pod;
}

// A new instance at this backend (first seen, or restarted); the one before it is gone.
void FleetManager::adopt_instance(Backend& b, const std::string& id, int reported_limit) {
    if (b.instance) {
        log::warn("instance restarted: its sessions are gone",
                  {{"old_instance", b.instance->id}, {"instance", id}, {"backend", b.endpoint.address}});
        b.instance->membership.store(Membership::Gone);
    } else {
        log::info("instance discovered", {{"instance", id}, {"backend", b.endpoint.address}, {"pod", b.endpoint.pod}});
    }
    auto inst = std::make_shared<Instance>(id, b.endpoint.address, b.addr, b.addr_len, b.endpoint.pod);
    inst->series = MetricsRegistry::get().backend_series(b.endpoint.address);
    inst->membership.store(membership_of(b.endpoint));
    inst->capacity.set_flag(config_.max_in_flight_per_instance);
    inst->capacity.report(reported_limit, LimitSource::Health, now_ms());  // the worker's own word wins
    inst->failures_keep_routable = config_.health_check == HealthCheck::Off;
    b.instance = std::move(inst);
    publish();
}

void FleetManager::on_health(Backend& b, const HealthResult& r) {
    auto& metrics = DiscoveryMetrics::get();
    if (r.local) {
        // Our own shortage (descriptors, memory): the worker was not even asked.
        metrics.health_check("skipped").Increment();
        log::warn("health check not run: no resources on our side", {{"backend", b.endpoint.address}, {"reason", r.error}});
        return;
    }
    std::string id, id_error;
    if (config_.health_check == HealthCheck::Stepflow && r.healthy && !stepflow_instance_id(r, id, id_error)) {
        // A configuration error on the worker, not an outage: it stays out of routing until its
        // /health names a usable id, and /debug/backends says why.
        metrics.health_check("failure").Increment();
        if (b.last_error != id_error)
            log::error("worker's instanceId refused: instance not routable",
                       {{"backend", b.endpoint.address}, {"pod", b.endpoint.pod}, {"reason", id_error}});
        b.last_error = id_error;
        b.refused_id = true;
        if (b.instance) {
            log::warn("instance taken out of the fleet", {{"instance", b.instance->id}, {"backend", b.endpoint.address},
                                                           {"reason", id_error}});
            b.instance->membership.store(Membership::Gone);
            b.instance.reset();
            publish();
        }
        return;
    }
    metrics.health_check(r.healthy ? "success" : "failure").Increment();
    b.refusing = r.refused;
    if (r.healthy) b.last_passed = std::chrono::steady_clock::now();
    if (!r.healthy) {
        b.last_error = r.error;
        if (r.config_error && !b.config_error_logged) {
            b.config_error_logged = true;
            log::error("backend is not routable: configuration error", {{"backend", b.endpoint.address}, {"reason", r.error}});
        }
        if (!b.instance) {
            if (++b.failures_before_instance == 1 || log::enabled(log::Level::Debug))
                log::warn("health check failed", {{"backend", b.endpoint.address}, {"reason", r.error}});
            return;
        }
        if (b.instance->record_check_failure(config_.max_failures, r.error))
            log::warn("instance marked unhealthy", {{"instance", b.instance->id}, {"backend", b.endpoint.address},
                                                    {"pod", b.endpoint.pod}, {"reason", r.error}});
        return;
    }
    b.failures_before_instance = 0;
    b.refused_id = false;
    b.last_error.clear();
    if (config_.health_check != HealthCheck::Stepflow) id = id_for(b, r);
    if (b.instance && b.instance->id == id) {
        b.instance->capacity.report(r.max_concurrency, LimitSource::Health, now_ms());
        if (b.instance->record_check_success(config_.health_rise)) {
            log::info("instance healthy again", {{"instance", id}, {"backend", b.endpoint.address}});
            notify_routable();
        }
        return;
    }
    adopt_instance(b, id, r.max_concurrency);
}

void FleetManager::publish_now() {
    std::vector<InstancePtr> instances;
    instances.reserve(backends_.size());
    for (const auto& [_, b] : backends_)
        if (b->instance) instances.push_back(b->instance);
    publisher_.publish(make_fleet(++version_, std::move(instances)));
    log::debug("fleet published", {{"version", version_}, {"instances", uint64_t(backends_.size())}});
    notify_routable();  // work held while no instance was routable leaves now
}

std::vector<FleetManager::BackendView> FleetManager::backends() const {
    std::vector<BackendView> out;
    for (const auto& [_, b] : backends_) {
        BackendView v;
        v.endpoint = b->endpoint;
        v.instance = b->instance;
        if (b->instance) {
            v.state = b->instance->state_name();
            v.consecutive_failures = b->instance->consecutive_failures();
            v.last_error = b->instance->last_error();
        } else {
            v.state = b->refused_id ? "refused" : b->failures_before_instance > 0 ? "unreachable" : "starting";
            v.consecutive_failures = b->failures_before_instance;
            v.last_error = b->last_error;
        }
        v.routable = b->instance && b->instance->takes_new_work();
        if (!v.routable) {
            if (!b->instance)
                v.reason = b->last_error.empty() ? "waiting for the first health check" : b->last_error;
            else if (b->instance->membership.load() != Membership::Active)
                v.reason = std::string("endpoint is ") + to_string(b->instance->membership.load());
            else
                v.reason = "unhealthy: " + (v.last_error.empty() ? std::string("failed checks") : v.last_error);
        }
        if (b->probe) v.check_interval = b->probe->interval();
        out.push_back(std::move(v));
    }
    return out;
}

}  // namespace stepflow
