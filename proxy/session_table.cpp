#include "proxy/session_table.h"

#include <cstdio>

namespace stepflow {
namespace {

// Below this many sessions one shard keeps the LRU order exact; above it, 64 shards split the
// lock and the bound is per shard (max / 64 each).
constexpr size_t kShardedAbove = 4096;
constexpr size_t kShards = 64;
// Idle entries removed from a shard's tail per call: keeps every call O(1) while a shard that is
// used at all sheds its idle entries steadily.
constexpr int kExpirePerCall = 4;

uint64_t fnv1a(std::string_view s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

}  // namespace

SessionTable::SessionTable(size_t max_sessions, std::chrono::milliseconds idle_timeout) : idle_timeout_(idle_timeout) {
    size_t shards = max_sessions > kShardedAbove ? kShards : 1;
    per_shard_limit_ = (max_sessions + shards - 1) / shards;
    for (size_t i = 0; i < shards; ++i) shards_.push_back(std::make_unique<Shard>());
}

SessionTable::Shard& SessionTable::shard_for(std::string_view session) {
    if (shards_.size() == 1) return *shards_[0];
    return *shards_[(fnv1a(session) >> 32) % shards_.size()];
}

void SessionTable::expire_tail(Shard& s, Clock::time_point now) {
    for (int i = 0; i < kExpirePerCall && !s.lru.empty(); ++i) {
        Entry& oldest = s.lru.back();
        if (now - oldest.last_used <= idle_timeout_) return;
        s.index.erase(oldest.session);
        s.lru.pop_back();
        ++s.expired;
    }
}

bool SessionTable::lookup(std::string_view session, std::string& instance_out, Clock::time_point now) {
    Shard& s = shard_for(session);
    std::lock_guard lock(s.mutex);
    expire_tail(s, now);
    auto it = s.index.find(session);
    if (it == s.index.end()) return false;
    Entry& e = *it->second;
    if (now - e.last_used > idle_timeout_) {
        s.lru.erase(it->second);
        s.index.erase(it);
        ++s.expired;
        return false;
    }
    e.last_used = now;
    s.lru.splice(s.lru.begin(), s.lru, it->second);
    instance_out.assign(e.instance);
    return true;
}

void SessionTable::remember(std::string_view session, std::string_view instance, Clock::time_point now) {
    Shard& s = shard_for(session);
    std::lock_guard lock(s.mutex);
    expire_tail(s, now);
    auto it = s.index.find(session);
    if (it != s.index.end()) {
        Entry& e = *it->second;
        e.instance.assign(instance);
        e.last_used = now;
        s.lru.splice(s.lru.begin(), s.lru, it->second);
        return;
    }
    if (s.lru.size() >= per_shard_limit_) {
        s.index.erase(s.lru.back().session);
        s.lru.pop_back();
        ++s.evicted;
    }
    s.lru.push_front(Entry{std::string(session), std::string(instance), now});
    s.index.emplace(s.lru.front().session, s.lru.begin());
}

void SessionTable::forget(std::string_view session) {
    Shard& s = shard_for(session);
    std::lock_guard lock(s.mutex);
    auto it = s.index.find(session);
    if (it == s.index.end()) return;
    auto entry = it->second;
    s.index.erase(it);
    s.lru.erase(entry);
}

size_t SessionTable::size() const {
    size_t n = 0;
    for (const auto& s : shards_) {
        std::lock_guard lock(s->mutex);
        n += s->lru.size();
    }
    return n;
}

uint64_t SessionTable::evicted() const {
    uint64_t n = 0;
    for (const auto& s : shards_) {
        std::lock_guard lock(s->mutex);
        n += s->evicted;
    }
    return n;
}

uint64_t SessionTable::expired() const {
    uint64_t n = 0;
    for (const auto& s : shards_) {
        std::lock_guard lock(s->mutex);
        n += s->expired;
    }
    return n;
}

std::string session_log_hash(std::string_view session) {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(session)));
    return std::string(buf, 8);
}

}  // namespace stepflow
