#include "proxy/block_cache.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace stepflow {
namespace {

// Freed small blocks kept per thread by size (16-byte steps, so a block is no bigger than
// malloc's own would be), for what every stream allocates and frees again moments later:
// nghttp2's stream, frame and header-copy objects, and Stream itself. glibc's per-thread cache
// keeps only 7 blocks of a size, fewer than the streams a connection cycles through, so
// without this most of them take malloc's slower paths.
class BlockCache {
public:
    static constexpr size_t kClasses = 128;  // 16 B .. 2 KiB
    static constexpr size_t kNone = kClasses;
    static constexpr size_t kBudget = 256 * 1024;  // bytes kept per thread at most
    static size_t size_of(size_t cls) { return (cls + 1) * 16; }
    static size_t class_of(size_t n) { return n <= size_of(kClasses - 1) ? (n + 15) / 16 - 1 : kNone; }

    void* take(size_t cls) {
        Free* f = free_[cls];
        if (!f) return nullptr;
        free_[cls] = f->next;
        kept_ -= size_of(cls);
        return f;
    }
    bool give(void* p, size_t cls) {
        if (kept_ + size_of(cls) > kBudget) return false;
        free_[cls] = new (p) Free{free_[cls]};
        kept_ += size_of(cls);
        return true;
    }
    ~BlockCache() {
        for (Free* f : free_)
            while (f) {
                Free* next = f->next;
                std::free(f);
                f = next;
            }
    }

private:
    struct Free {
        Free* next;
    };
    Free* free_[kClasses] = {};
    size_t kept_ = 0;
};

thread_local BlockCache block_cache;

#ifdef __SANITIZE_ADDRESS__
constexpr bool kCacheBlocks = false;  // AddressSanitizer must see every block freed
#else
constexpr bool kCacheBlocks = true;
#endif

// A block from the cache or malloc, with its class in a 16-byte header (keeping malloc's
// alignment) so that it can be given back.
constexpr size_t kBlockHeader = 16;

}  // namespace

void* block_alloc(size_t size) {
    size_t cls = BlockCache::class_of(size + kBlockHeader);
    void* block = kCacheBlocks && cls != BlockCache::kNone ? block_cache.take(cls) : nullptr;
    if (!block) block = std::malloc(cls != BlockCache::kNone ? BlockCache::size_of(cls) : size + kBlockHeader);
    if (!block) return nullptr;
    *static_cast<size_t*>(block) = cls;
    return static_cast<char*>(block) + kBlockHeader;
}

void block_free(void* p) {
    if (!p) return;
    void* block = static_cast<char*>(p) - kBlockHeader;
    size_t cls = *static_cast<size_t*>(block);
    if (!kCacheBlocks || cls == BlockCache::kNone || !block_cache.give(block, cls)) std::free(block);
}

void* block_realloc(void* p, size_t size) {
    if (!p) return block_alloc(size);
    void* block = static_cast<char*>(p) - kBlockHeader;
    size_t cls = *static_cast<size_t*>(block);
    if (cls == BlockCache::kNone) {  // stays a plain malloc block
        void* grown = std::realloc(block, size + kBlockHeader);
        return grown ? static_cast<char*>(grown) + kBlockHeader : nullptr;
    }
    size_t capacity = BlockCache::size_of(cls) - kBlockHeader;
    if (size <= capacity) return p;
    void* q = block_alloc(size);
    if (!q) return nullptr;
    std::memcpy(q, p, capacity);
    block_free(p);
    return q;
}

}  // namespace stepflow
