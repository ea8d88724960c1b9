// Sessions learned from response headers (--session-header): session id -> instance id, shared
// by every request thread. Sharded, one mutex per shard, so threads rarely meet on a lock; each
// shard keeps its entries in least-recently-used order for eviction and idle expiry.
//
// Sized for millions of entries: an entry is 32 bytes in a block that never moves, plus its id
// in one exact allocation and 8-16 bytes of open-addressing index; instance ids are interned (one
// copy per instance, shared by all its sessions). See docs/sessions.md for the measured size.
#pragma once

#include <chrono>
#include <cstdint>
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
    ~SessionTable();
    SessionTable(const SessionTable&) = delete;
    SessionTable& operator=(const SessionTable&) = delete;

    // The instance id for `session` into `instance_out` (buffer reused by the caller); false when
    // unknown or idle past the timeout. A hit counts as use.
    bool lookup(std::string_view session, std::string& instance_out, Clock::time_point now = Clock::now());
    // Remembers (or moves) `session` -> `instance`; a full shard first evicts its least recently
    // used session (counted in evicted()), so a new session is never refused.
    void remember(std::string_view session, std::string_view instance, Clock::time_point now = Clock::now());
    void forget(std::string_view session);

    size_t size() const;
    uint64_t evicted() const;  // pushed out by --max-sessions
    uint64_t expired() const;  // idle past --session-idle-timeout
    size_t bytes() const;      // heap the table holds: entries, index, session ids, instance ids
    size_t instances() const;  // distinct instance ids held

private:
    struct InstanceId;  // interned: a count of the entries naming it, then its bytes
    struct Entry {
        char* session;  // one allocation: u32 length, then the bytes
        InstanceId* instance;
        int64_t last_used;     // Clock ticks
        uint32_t newer, older; // LRU links (entry numbers); `older` also links the free list
    };
    struct Bucket {
        uint32_t entry;  // kNone: empty
        uint32_t hash;
    };
    struct Shard {
        mutable std::mutex mutex;
        std::vector<std::unique_ptr<Entry[]>> blocks;  // entries never move, so growth copies nothing
        uint32_t high_water = 0, free_list, newest, oldest;
        std::vector<Bucket> index;  // power-of-two size, linear probing, backward-shift delete
        size_t count = 0, session_bytes = 0;
        uint64_t evicted = 0, expired = 0;
        Shard();
    };

    Shard& shard_for(uint64_t hash);
    Entry& entry(Shard& s, uint32_t n) const;
    size_t find(Shard& s, std::string_view session, uint32_t hash) const;  // bucket position or npos
    void insert_bucket(Shard& s, uint32_t n, uint32_t hash);
    void erase_bucket(Shard& s, size_t pos);
    void unlink(Shard& s, uint32_t n);
    void push_newest(Shard& s, uint32_t n);
    void remove(Shard& s, size_t pos);  // drops the entry whose bucket is at `pos`
    void expire_tail(Shard& s, int64_t now);
    InstanceId* intern(std::string_view instance);
    void release(InstanceId* id);

    std::vector<std::unique_ptr<Shard>> shards_;
    size_t per_shard_limit_;
    uint32_t block_shift_;  // entries per block: 1 << block_shift_
    int64_t idle_ticks_;
    mutable std::mutex ids_mutex_;  // taken inside a shard's lock, never the other way round
    std::unordered_map<std::string_view, InstanceId*> ids_;
    size_t id_bytes_ = 0;
};

// A short, stable digest of an opaque session id for logs: the id itself never appears.
std::string session_log_hash(std::string_view session);

}  // namespace stepflow
