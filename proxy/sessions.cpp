#include "proxy/sessions.h"

#include <mutex>

#include <prometheus/family.h>

#include "proxy/http1.h"
#include "proxy/metrics.h"

namespace stepflow {
namespace {

// Method names of MCP 2025-11-25 (and the tasks of 2026 drafts).
constexpr std::array<std::string_view, kMcpMethods> kMcpMethodNames = {
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
    "resources/templates/list", "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get",
    "completion/complete", "logging/setLevel", "roots/list", "sampling/createMessage", "elicitation/create",
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "tasks/get", "tasks/cancel"};

}  // namespace

std::unique_ptr<Sessions> Sessions::from_config(const Config& config, std::string& error, bool& failed) {
    failed = false;
    if (config.session_headers.empty()) return nullptr;
    auto s = std::make_unique<Sessions>();
    s->headers = config.session_headers;
    if (config.session_key_file.empty()) {
        s->table = std::make_unique<SessionTable>(config.max_sessions, config.session_idle_timeout);
        return s;
    }
    SessionKey current{}, previous{};
    std::optional<SessionKey> prev;
    if (!load_session_key(config.session_key_file, current, error)) {
        error = "--session-key-file: " + error;
        failed = true;
        return nullptr;
    }
    if (!config.session_key_file_previous.empty()) {
        if (!load_session_key(config.session_key_file_previous, previous, error)) {
            error = "--session-key-file-previous: " + error;
            failed = true;
            return nullptr;
        }
        prev = previous;
    }
    s->sealer = std::make_unique<SessionSealer>(current, prev);
    s->hide_routed_instance = !config.expose_instance;
    s->hide_instance_header = !config.expose_instance && config.health_check != HealthCheck::Stepflow;
    return s;
}

const std::string* Sessions::match(std::string_view name) const {
    for (const auto& h : headers)
        if (http1::iequals(name, h)) return &h;
    return nullptr;
}

int Sessions::count_in(const std::vector<http1::Header>& fields, size_t& first) const {
    int n = 0;
    for (size_t i = 0; i < fields.size(); ++i)
        if (match(fields[i].name) && n++ == 0) first = i;
    return n;
}

size_t mcp_method_index(std::string_view method) {
    for (size_t i = 0; i < kMcpMethodNames.size(); ++i)
        if (kMcpMethodNames[i] == method) return i;
    return kMcpMethods;
}

SessionMetrics& SessionMetrics::get() {
    static SessionMetrics m;
    return m;
}

SessionMetrics::SessionMetrics() {
    using namespace prometheus;
    auto& r = Metrics::get().registry();
    learned = &BuildCounter().Name("stepflow_lb_sessions_learned_total")
                   .Help("Session ids seen in a response header (--session-header) and remembered or sealed")
                   .Register(r).Add({});
    ended = &BuildCounter().Name("stepflow_lb_sessions_ended_total")
                 .Help("Sessions ended by a DELETE answered 2xx").Register(r).Add({});
    auto& nf = BuildCounter().Name("stepflow_lb_session_not_found_total")
                   .Help("Requests answered 404 Session not found by the balancer, by reason").Register(r);
    not_found[size_t(SessionMiss::InstanceGone)] = &nf.Add({{"reason", "instance-gone"}});
    not_found[size_t(SessionMiss::InvalidSeal)] = &nf.Add({{"reason", "invalid-seal"}});
    active = &BuildGauge().Name("stepflow_lb_sessions").Help("Learned sessions in the table").Register(r).Add({});
    auto& ev = BuildCounter().Name("stepflow_lb_sessions_evicted_total")
                   .Help("Learned sessions dropped: lru (--max-sessions reached) or idle (--session-idle-timeout)")
                   .Register(r);
    evicted_lru = &ev.Add({{"reason", "lru"}});
    evicted_idle = &ev.Add({{"reason", "idle"}});
    auto& mcp = BuildCounter().Name("stepflow_lb_mcp_requests_total")
                    .Help("Requests carrying an Mcp-Method header, by method (unknown names: other)").Register(r);
    for (size_t i = 0; i < kMcpMethods; ++i) mcp_requests[i] = &mcp.Add({{"method", std::string(kMcpMethodNames[i])}});
    mcp_requests[kMcpMethods] = &mcp.Add({{"method", "other"}});
}

void SessionMetrics::refresh(const Sessions* sessions) {
    if (!sessions || !sessions->table) return;
    static std::mutex mutex;  // scrapes may overlap
    std::lock_guard lock(mutex);
    active->Set(double(sessions->table->size()));
    uint64_t lru = sessions->table->evicted(), idle = sessions->table->expired();
    evicted_lru->Increment(double(lru - seen_lru_));
    evicted_idle->Increment(double(idle - seen_idle_));
    seen_lru_ = lru;
    seen_idle_ = idle;
}

}  // namespace stepflow
