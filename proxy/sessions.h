// Session affinity learned from response headers (--session-header): the settings and state the
// request threads share, and the metrics about them. Either a table of learned ids (one replica)
// or a sealer (ids carry their instance, any replica routes them); see docs/sessions.md.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>

struct event_base;
struct event;

#include "core/config.h"
#include "core/http1.h"
#include "proxy/session_seal.h"
#include "proxy/session_table.h"

namespace stepflow {

struct Sessions {
    std::vector<std::string> headers;       // --session-header names
    std::unique_ptr<SessionTable> table;    // learned mode
    std::unique_ptr<SessionSealer> sealer;  // sealed mode (--session-key-file)
    // Sealed mode tells clients nothing about the fleet: responses carry no
    // X-Stepflow-Routed-Instance, and no instance header unless Stepflow workers need it (their
    // orchestrator pins callbacks with it). --expose-instance keeps both.
    bool hide_routed_instance = false;
    bool hide_instance_header = false;
    size_t max_sessions = 0;                // the table's bound, after --max-sessions 0 (auto) is resolved

    // Null when no --session-header is given; `failed` with `error` naming the file on a bad key.
    static std::unique_ptr<Sessions> from_config(const Config& config, std::string& error, bool& failed);
    // The name of the session header `name` matches, or null.
    const std::string* match(std::string_view name) const;
    // How many of the request's fields are session headers (any configured name, any case);
    // `first` is set to the first one's index.
    int count_in(const std::vector<http1::Header>& fields, size_t& first) const;

    // Sealed mode: re-reads the key files every second on `base` (the control loop) and when
    // reload_keys() is called (SIGHUP); a changed set replaces the keys, a broken one is logged
    // and the keys in use stay.
    void watch_keys(event_base* base);
    void reload_keys();
    ~Sessions();

private:
    std::vector<std::string> key_paths_;
    std::string key_content_;  // what the files held at the last load, to notice a change
    event* key_timer_ = nullptr;
};

// The default bound of the learned table: a quarter of the memory limit of the cgroup we run in
// (memory.max, or v1's memory.limit_in_bytes) at 128 bytes a session, at most 1,000,000.
size_t default_max_sessions(const std::string& cgroup_root = "/sys/fs/cgroup");
constexpr size_t kSessionBudgetBytes = 128;  // per entry: measured ~100 for a 36-byte id (bench/route.sh session)

// Why a request naming a session got 404 "Session not found" from the balancer.
enum class SessionMiss : uint8_t { InstanceGone, InvalidSeal, Expired, Count };

// MCP methods counted by name (the Mcp-Method request header); anything else is "other", so
// clients cannot mint series.
size_t mcp_method_index(std::string_view method);
constexpr size_t kMcpMethods = 22;  // known names; index kMcpMethods is "other"

struct SessionMetrics {
    static SessionMetrics& get();
    // Copies the table's size and eviction counts into the exported series (at scrape time).
    void refresh(const Sessions* sessions);

    prometheus::Counter* learned = nullptr;
    prometheus::Counter* ended = nullptr;
    std::array<prometheus::Counter*, size_t(SessionMiss::Count)> not_found{};
    prometheus::Gauge* active = nullptr;
    prometheus::Gauge* table_bytes = nullptr;
    prometheus::Counter* resealed = nullptr;
    std::array<prometheus::Counter*, 2> key_reloads{};  // ok, error
    prometheus::Counter* evicted_lru = nullptr;
    prometheus::Counter* evicted_idle = nullptr;
    std::array<prometheus::Counter*, kMcpMethods + 1> mcp_requests{};

private:
    SessionMetrics();
    uint64_t seen_lru_ = 0, seen_idle_ = 0;
};

}  // namespace stepflow
