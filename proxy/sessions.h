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

#include "proxy/config.h"
#include "proxy/http1.h"
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

    // Null when no --session-header is given; exits with a clear message on a bad key file.
    static std::unique_ptr<Sessions> from_config(const Config& config, std::string& error, bool& failed);
    // The name of the session header `name` matches, or null.
    const std::string* match(std::string_view name) const;
    // How many of the request's fields are session headers (any configured name, any case);
    // `first` is set to the first one's index.
    int count_in(const std::vector<http1::Header>& fields, size_t& first) const;
};

// Why a request naming a session got 404 "Session not found" from the balancer.
enum class SessionMiss : uint8_t { InstanceGone, InvalidSeal, Count };

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
    prometheus::Counter* evicted_lru = nullptr;
    prometheus::Counter* evicted_idle = nullptr;
    std::array<prometheus::Counter*, kMcpMethods + 1> mcp_requests{};

private:
    SessionMetrics();
    uint64_t seen_lru_ = 0, seen_idle_ = 0;
};

}  // namespace stepflow
