#include "proxy/sessions.h"

#include <event2/event.h>

#include <algorithm>
#include <fstream>
#include <mutex>

#include <prometheus/family.h>

#include "core/http1.h"
#include "core/log.h"
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

// The key files' bytes, names included: a change in any of them (a Secret's ..data swap) shows.
std::string read_key_files(const std::vector<std::string>& paths) {
    std::string all;
    for (const auto& p : paths) {
        std::vector<SessionKey> keys;
        std::string error;
        all += p + '\0';
        if (load_session_keys(p, keys, error)) {
            for (const auto& k : keys) all.append(reinterpret_cast<const char*>(k.data()), k.size());
        } else {
            all += error;
        }
        all += '\0';
    }
    return all;
}

bool load_keys(const std::vector<std::string>& paths, std::vector<SessionKey>& keys, std::string& error) {
    for (const auto& p : paths)
        if (!load_session_keys(p, keys, error)) return false;
    return true;
}

void on_key_timer(evutil_socket_t, short, void* arg) { static_cast<Sessions*>(arg)->reload_keys(); }

}  // namespace

size_t default_max_sessions(const std::string& cgroup_root) {
    constexpr size_t kCeiling = 1000000;
    uint64_t limit = 0;
    for (const char* file : {"/memory.max", "/memory/memory.limit_in_bytes"}) {
        std::ifstream in(cgroup_root + file);
        std::string text;
        if (in >> text && !text.empty() && text != "max") {
            try {
                limit = std::stoull(text);
            } catch (...) {
                limit = 0;
            }
            break;
        }
    }
    if (limit == 0 || limit >= (uint64_t(1) << 60)) return kCeiling;  // no limit (v1 says so with a huge number)
    return std::clamp<size_t>(size_t(limit / 4 / kSessionBudgetBytes), 1000, kCeiling);
}

std::unique_ptr<Sessions> Sessions::from_config(const Config& config, std::string& error, bool& failed) {
    failed = false;
    if (config.session_headers.empty()) return nullptr;
    auto s = std::make_unique<Sessions>();
    s->headers = config.session_headers;
    if (config.session_key_file.empty()) {
        s->max_sessions = config.max_sessions ? config.max_sessions : default_max_sessions();
        s->table = std::make_unique<SessionTable>(s->max_sessions, config.session_idle_timeout);
        log::info("session table", {{"max_sessions", uint64_t(s->max_sessions)},
                                    {"max_bytes", uint64_t(s->max_sessions * kSessionBudgetBytes)}});
        return s;
    }
    s->key_paths_.push_back(config.session_key_file);
    if (!config.session_key_file_previous.empty()) s->key_paths_.push_back(config.session_key_file_previous);
    std::vector<SessionKey> keys;
    if (!load_keys(s->key_paths_, keys, error)) {
        error = "--session-key-file: " + error;
        failed = true;
        return nullptr;
    }
    s->key_content_ = read_key_files(s->key_paths_);
    s->sealer = std::make_unique<SessionSealer>(
        std::move(keys), std::chrono::duration_cast<std::chrono::seconds>(config.session_max_age));
    s->hide_routed_instance = !config.expose_instance;
    s->hide_instance_header = !config.expose_instance && config.health_check != HealthCheck::Stepflow;
    return s;
}

void Sessions::watch_keys(event_base* base) {
    if (!sealer || key_timer_) return;
    key_timer_ = event_new(base, -1, EV_PERSIST, on_key_timer, this);
    timeval tv{1, 0};
    event_add(key_timer_, &tv);
}

void Sessions::reload_keys() {
    if (!sealer) return;
    std::string content = read_key_files(key_paths_);
    if (content == key_content_) return;
    key_content_ = content;
    std::vector<SessionKey> keys;
    std::string error;
    auto& metrics = SessionMetrics::get();
    if (!load_keys(key_paths_, keys, error)) {
        metrics.key_reloads[1]->Increment();
        log::error("session keys not reloaded: keeping the keys in use", {{"reason", error}});
        return;
    }
    size_t n = keys.size();
    sealer->set_keys(std::move(keys));
    metrics.key_reloads[0]->Increment();
    log::info("session keys reloaded", {{"keys", uint64_t(n)}});
}

Sessions::~Sessions() {
    if (key_timer_) event_free(key_timer_);
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
    not_found[size_t(SessionMiss::Expired)] = &nf.Add({{"reason", "expired"}});
    active = &BuildGauge().Name("stepflow_lb_sessions").Help("Learned sessions in the table").Register(r).Add({});
    table_bytes = &BuildGauge().Name("stepflow_lb_session_table_bytes")
                       .Help("Heap bytes the learned session table holds (entries, index, ids)").Register(r).Add({});
    resealed = &BuildCounter().Name("stepflow_lb_sessions_resealed_total")
                    .Help("Sealed ids opened with an older key (or format) and handed back sealed with the current key")
                    .Register(r).Add({});
    auto& reloads = BuildCounter().Name("stepflow_lb_session_key_reloads_total")
                        .Help("Changes of --session-key-file seen: ok (keys replaced) or error (kept the keys in use)")
                        .Register(r);
    key_reloads[0] = &reloads.Add({{"result", "ok"}});
    key_reloads[1] = &reloads.Add({{"result", "error"}});
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
    table_bytes->Set(double(sessions->table->bytes()));
    uint64_t lru = sessions->table->evicted(), idle = sessions->table->expired();
    evicted_lru->Increment(double(lru - seen_lru_));
    evicted_idle->Increment(double(idle - seen_idle_));
    seen_lru_ = lru;
    seen_idle_ = idle;
}

}  // namespace stepflow
