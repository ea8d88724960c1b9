// Turns what discovery reports (endpoints) into what routing uses (instances): runs a health
// probe per endpoint, learns each worker's instanceId, and publishes a new fleet snapshot
// whenever an instance appears, restarts or leaves. Lives on the control thread.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "discovery/endpoint.h"
#include "discovery/fleet.h"
#include "discovery/health_probe.h"
#include "discovery/publish_pacer.h"

struct event_base;
struct event;

namespace stepflow {

class FleetManager {
public:
    // `tls` (may be null) is the worker TLS context when --upstream-tls is on.
    FleetManager(event_base* base, const Config& config, FleetPublisher& publisher, TlsClient* tls);
    ~FleetManager();

    // The complete endpoint set, as a source reports it. Unknown addresses start being probed;
    // missing ones leave the fleet at once.
    void update(std::vector<Endpoint> endpoints);

    struct BackendView {
        Endpoint endpoint;
        InstancePtr instance;  // null until /health named one
        std::string state;     // instance state, or "starting" / "unreachable" / "refused"
        int consecutive_failures = 0;
        std::string last_error;
        bool routable = false;  // takes new work now
        std::string reason;     // why not, when not
        std::chrono::milliseconds check_interval{0};  // of its /health checks now; 0 without checks
    };
    std::vector<BackendView> backends() const;
    size_t backend_count() const { return backends_.size(); }
    // Discovery has reported its endpoint set at least once (possibly empty).
    bool synced() const { return synced_; }
    FleetPtr fleet() const { return publisher_.current(); }
    // Called (control thread) whenever an instance may have started taking new work: a snapshot
    // published, an endpoint ready again, a recovered health check. The data path installs one so
    // that work held in its admission queue leaves at once (proxy/demand.h: offer_queued_work).
    void on_routable(std::function<void()> hook) { on_routable_ = std::move(hook); }

private:
    struct Backend {
        Endpoint endpoint;
        sockaddr_storage addr{};
        socklen_t addr_len = 0;
        InstancePtr instance;
        int failures_before_instance = 0;
        bool refused_id = false;  // /health answered, but its instanceId is unusable
        bool config_error_logged = false;
        bool refusing = false;  // its last check's connect was refused
        std::chrono::steady_clock::time_point last_passed{};  // its last passed check
        std::string last_error;
        std::unique_ptr<HealthProbe> probe;
    };

    void on_health(Backend& backend, const HealthResult& result);
    // Checks run every --health-interval-down while health keeps the backend out of routing.
    void pace_checks(Backend& backend);
    // Live failures take an instance out on a request thread; this control-thread tick (every
    // --health-interval-down) finds such instances and checks them at once, then at that pace.
    static void on_takeout_watch(int, short, void* arg);
    void start_checking(Backend& backend);
    std::string id_for(const Backend& backend, const HealthResult& result) const;
    void adopt_instance(Backend& backend, const std::string& id, int reported_limit = 0);
    static Membership membership_of(const Endpoint& e);
    // The snapshot holds the set of instances; their state (membership, health, load) lives in
    // each Instance and is read live, so only a change of the set is published.
    void publish() { pacer_.request(); }
    void publish_now();
    void notify_routable() {
        if (on_routable_) on_routable_();
    }

    event_base* base_;
    const Config& config_;
    FleetPublisher& publisher_;
    TlsClient* tls_;
    std::map<std::string, std::unique_ptr<Backend>> backends_;  // by address
    uint64_t version_ = 0;
    bool synced_ = false;
    std::function<void()> on_routable_;
    event* takeout_watch_ = nullptr;  // null when both intervals are the same
    // 5,000 workers passing their first health check publish once per burst, not 5,000 times.
    PublishPacer pacer_{base_, [this] { publish_now(); }};
};

}  // namespace stepflow
