#include "proxy/session_table.h"

#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

namespace stepflow {

struct SessionTable::InstanceId {
    uint32_t refs;  // entries naming it; changed only under ids_mutex_
    uint32_t len;
    std::string_view view() const { return {reinterpret_cast<const char*>(this + 1), len}; }
};

namespace {

// Below this many sessions one shard keeps the LRU order exact; above it, 64 shards split the
// lock and the bound is per shard (max / 64 each).
constexpr size_t kShardedAbove = 4096;
constexpr size_t kShards = 64;
// Idle entries removed from a shard's tail per call: keeps every call O(1) while a shard that is
// used at all sheds its idle entries steadily.
constexpr int kExpirePerCall = 4;
constexpr uint32_t kNone = UINT32_MAX;
constexpr size_t kNotFound = SIZE_MAX;
constexpr uint32_t kMaxBlock = 256;  // entries per block: 8 KiB
constexpr size_t kMinIndex = 16;

// The table's hash: libstdc++'s (murmur-style, 8 bytes a step), several times faster than FNV-1a
// on a 36-byte id. The log hash below keeps FNV-1a: its output must stay stable across builds.
uint64_t table_hash(std::string_view s) { return std::hash<std::string_view>{}(s); }

uint64_t fnv1a(std::string_view s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

// What an allocation really takes from the heap: its usable size plus glibc's chunk header.
size_t heap_cost(void* p) { return malloc_usable_size(p) + sizeof(size_t); }

std::string_view session_of(const char* stored) {
    uint32_t len;
    std::memcpy(&len, stored, sizeof len);
    return {stored + sizeof len, len};
}

}  // namespace

SessionTable::Shard::Shard() : free_list(kNone), newest(kNone), oldest(kNone), index(kMinIndex, Bucket{kNone, 0}) {}

SessionTable::SessionTable(size_t max_sessions, std::chrono::milliseconds idle_timeout)
    : idle_ticks_(std::chrono::duration_cast<Clock::duration>(idle_timeout).count()) {
    size_t shards = max_sessions > kShardedAbove ? kShards : 1;
    per_shard_limit_ = (max_sessions + shards - 1) / shards;
    // A power of two, so finding an entry is a shift and a mask: this runs several times a call.
    block_shift_ = 0;
    while ((size_t(1) << block_shift_) < std::min<size_t>(kMaxBlock, per_shard_limit_)) ++block_shift_;
    for (size_t i = 0; i < shards; ++i) shards_.push_back(std::make_unique<Shard>());
}

SessionTable::~SessionTable() {
    for (auto& s : shards_)
        for (uint32_t n = s->newest; n != kNone; n = entry(*s, n).older) std::free(entry(*s, n).session);
    for (auto& [name, id] : ids_) std::free(id);
}

SessionTable::Shard& SessionTable::shard_for(uint64_t hash) {
    if (shards_.size() == 1) return *shards_[0];
    return *shards_[(hash >> 32) % shards_.size()];
}

SessionTable::Entry& SessionTable::entry(Shard& s, uint32_t n) const {
    return s.blocks[n >> block_shift_][n & ((1u << block_shift_) - 1)];
}

size_t SessionTable::find(Shard& s, std::string_view session, uint32_t hash) const {
    size_t mask = s.index.size() - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        const Bucket& b = s.index[i];
        if (b.entry == kNone) return kNotFound;
        if (b.hash == hash && session_of(entry(s, b.entry).session) == session) return i;
    }
}

void SessionTable::insert_bucket(Shard& s, uint32_t n, uint32_t hash) {
    if ((s.count + 1) * 4 > s.index.size() * 3) {  // keep the load under 3/4: probes stay short
        std::vector<Bucket> old(s.index.size() * 2, Bucket{kNone, 0});
        old.swap(s.index);
        size_t mask = s.index.size() - 1;
        for (const Bucket& b : old) {
            if (b.entry == kNone) continue;
            size_t i = b.hash & mask;
            while (s.index[i].entry != kNone) i = (i + 1) & mask;
            s.index[i] = b;
        }
    }
    size_t mask = s.index.size() - 1;
    size_t i = hash & mask;
    while (s.index[i].entry != kNone) i = (i + 1) & mask;
    s.index[i] = Bucket{n, hash};
}

void SessionTable::erase_bucket(Shard& s, size_t pos) {
    // Backward shift: later buckets of the same probe run move up, so no tombstones pile up.
    size_t mask = s.index.size() - 1;
    for (size_t j = (pos + 1) & mask; s.index[j].entry != kNone; j = (j + 1) & mask) {
        size_t home = s.index[j].hash & mask;
        if (((j - home) & mask) >= ((j - pos) & mask)) {
            s.index[pos] = s.index[j];
            pos = j;
        }
    }
    s.index[pos].entry = kNone;
}

void SessionTable::unlink(Shard& s, uint32_t n) {
    Entry& e = entry(s, n);
    if (e.newer != kNone) entry(s, e.newer).older = e.older;
    else s.newest = e.older;
    if (e.older != kNone) entry(s, e.older).newer = e.newer;
    else s.oldest = e.newer;
}

void SessionTable::push_newest(Shard& s, uint32_t n) {
    Entry& e = entry(s, n);
    e.newer = kNone;
    e.older = s.newest;
    if (s.newest != kNone) entry(s, s.newest).newer = n;
    s.newest = n;
    if (s.oldest == kNone) s.oldest = n;
}

void SessionTable::remove(Shard& s, size_t pos) {
    uint32_t n = s.index[pos].entry;
    Entry& e = entry(s, n);
    erase_bucket(s, pos);
    unlink(s, n);
    s.session_bytes -= heap_cost(e.session);
    std::free(e.session);
    release(e.instance);
    e.session = nullptr;
    e.instance = nullptr;
    e.older = s.free_list;
    s.free_list = n;
    --s.count;
}

void SessionTable::expire_tail(Shard& s, int64_t now) {
    for (int i = 0; i < kExpirePerCall && s.oldest != kNone; ++i) {
        Entry& oldest = entry(s, s.oldest);
        if (now - oldest.last_used <= idle_ticks_) return;
        std::string_view id = session_of(oldest.session);
        remove(s, find(s, id, uint32_t(table_hash(id))));
        ++s.expired;
    }
}

SessionTable::InstanceId* SessionTable::intern(std::string_view instance) {
    std::lock_guard lock(ids_mutex_);
    auto it = ids_.find(instance);
    if (it != ids_.end()) {
        ++it->second->refs;
        return it->second;
    }
    auto* id = static_cast<InstanceId*>(std::malloc(sizeof(InstanceId) + instance.size()));
    if (!id) throw std::bad_alloc();
    id->refs = 1;
    id->len = uint32_t(instance.size());
    std::memcpy(id + 1, instance.data(), instance.size());
    ids_.emplace(id->view(), id);
    id_bytes_ += heap_cost(id);
    return id;
}

void SessionTable::release(InstanceId* id) {
    std::lock_guard lock(ids_mutex_);
    if (--id->refs > 0) return;
    ids_.erase(id->view());
    id_bytes_ -= heap_cost(id);
    std::free(id);
}

bool SessionTable::lookup(std::string_view session, std::string& instance_out, Clock::time_point now) {
    uint64_t h = table_hash(session);
    Shard& s = shard_for(h);
    int64_t t = now.time_since_epoch().count();
    std::lock_guard lock(s.mutex);
    expire_tail(s, t);
    size_t pos = find(s, session, uint32_t(h));
    if (pos == kNotFound) return false;
    uint32_t n = s.index[pos].entry;
    Entry& e = entry(s, n);
    if (t - e.last_used > idle_ticks_) {
        remove(s, pos);
        ++s.expired;
        return false;
    }
    e.last_used = t;
    unlink(s, n);
    push_newest(s, n);
    instance_out.assign(e.instance->view());  // the entry holds a reference: the id stays while we copy
    return true;
}

void SessionTable::remember(std::string_view session, std::string_view instance, Clock::time_point now) {
    uint64_t h = table_hash(session);
    Shard& s = shard_for(h);
    int64_t t = now.time_since_epoch().count();
    std::lock_guard lock(s.mutex);
    expire_tail(s, t);
    size_t pos = find(s, session, uint32_t(h));
    if (pos != kNotFound) {
        uint32_t n = s.index[pos].entry;
        Entry& e = entry(s, n);
        if (e.instance->view() != instance) {
            InstanceId* old = e.instance;
            e.instance = intern(instance);
            release(old);
        }
        e.last_used = t;
        unlink(s, n);
        push_newest(s, n);
        return;
    }
    if (s.count >= per_shard_limit_ && s.oldest != kNone) {
        std::string_view victim = session_of(entry(s, s.oldest).session);
        remove(s, find(s, victim, uint32_t(table_hash(victim))));
        ++s.evicted;
    }
    uint32_t n;
    if (s.free_list != kNone) {
        n = s.free_list;
        s.free_list = entry(s, n).older;
    } else {
        if ((s.high_water & ((1u << block_shift_) - 1)) == 0)
            s.blocks.push_back(std::make_unique<Entry[]>(size_t(1) << block_shift_));
        n = s.high_water++;
    }
    auto* stored = static_cast<char*>(std::malloc(sizeof(uint32_t) + session.size()));
    if (!stored) throw std::bad_alloc();
    uint32_t len = uint32_t(session.size());
    std::memcpy(stored, &len, sizeof len);
    std::memcpy(stored + sizeof len, session.data(), session.size());
    Entry& e = entry(s, n);
    e.session = stored;
    e.instance = intern(instance);
    e.last_used = t;
    push_newest(s, n);
    insert_bucket(s, n, uint32_t(h));
    ++s.count;
    s.session_bytes += heap_cost(stored);
}

void SessionTable::forget(std::string_view session) {
    uint64_t h = table_hash(session);
    Shard& s = shard_for(h);
    std::lock_guard lock(s.mutex);
    size_t pos = find(s, session, uint32_t(h));
    if (pos != kNotFound) remove(s, pos);
}

size_t SessionTable::size() const {
    size_t n = 0;
    for (const auto& s : shards_) {
        std::lock_guard lock(s->mutex);
        n += s->count;
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

size_t SessionTable::bytes() const {
    size_t n = 0;
    for (const auto& s : shards_) {
        std::lock_guard lock(s->mutex);
        n += (s->blocks.size() << block_shift_) * sizeof(Entry) + s->index.size() * sizeof(Bucket) + s->session_bytes;
    }
    std::lock_guard lock(ids_mutex_);
    // The interning map's nodes and buckets, roughly: a node is a key view, a pointer and a link.
    return n + id_bytes_ + ids_.size() * (sizeof(std::string_view) + 2 * sizeof(void*) + 16) +
           ids_.bucket_count() * sizeof(void*);
}

size_t SessionTable::instances() const {
    std::lock_guard lock(ids_mutex_);
    return ids_.size();
}

std::string session_log_hash(std::string_view session) {
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(session)));
    return std::string(buf, 8);
}

}  // namespace stepflow
