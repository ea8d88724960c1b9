// Sessions learned from response headers (--session-header): session id -> instance id, shared
// by every request thread. Sharded, one mutex per shard, so threads rarely meet on a lock; each
// shard keeps its entries in least-recently-used order for eviction and idle expiry.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace stepflow {

class SessionTable {
public:
    using Clock = std::chrono::steady_clock;

    SessionTable(size_t max_sessions, std::chrono::milliseconds idle_timeout);

    // The instance id for `session` into `instance_out` (buffer reused by the caller); false when
    // unknown or idle past the timeout. A hit counts as use.
    bool lookup(std::string_view session, std::string& instance_out, Clock::time_point now = Clock::now());
    // Remembers (or moves) `session` -> `instance`, evicting the least recently used entry of a
    // full shard.
    void remember(std::string_view session, std::string_view instance, Clock::time_point now = Clock::now());
    void forget(std::string_view session);

    size_t size() const;
    uint64_t evicted() const;  // pushed out by --max-sessions
    uint64_t expired() const;  // idle past --session-idle-timeout

private:
    struct Entry {
        std::string session;
        std::string instance;
        Clock::time_point last_used;
    };
    struct Shard {
        mutable std::mutex mutex;
        std::list<Entry> lru;  // front: most recently used
        std::unordered_map<std::string_view, std::list<Entry>::iterator> index;  // keys view Entry::session
        uint64_t evicted = 0, expired = 0;
    };
    Shard& shard_for(std::string_view session);
    void expire_tail(Shard& shard, Clock::time_point now);

    std::vector<std::unique_ptr<Shard>> shards_;
    size_t per_shard_limit_;
    std::chrono::milliseconds idle_timeout_;
};

// A short, stable digest of an opaque session id for logs: the id itself never appears.
std::string session_log_hash(std::string_view session);

}  // namespace stepflow
