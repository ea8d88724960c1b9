// A per-thread cache of freed small blocks, for objects that every request allocates and frees
// again moments later: libevent's buffer chains, nghttp2's stream, frame and header-copy
// objects, and our Stream.
#pragma once

#include <cstddef>

namespace stepflow {

// malloc/free/realloc look-alikes: blocks up to 2 KiB come from, and go back to, the calling
// thread's cache. Sanitizer builds pass everything to malloc so that every free is seen.
void* block_alloc(size_t size);
void block_free(void* p);
void* block_realloc(void* p, size_t size);

}  // namespace stepflow
