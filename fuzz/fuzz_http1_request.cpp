// HTTP/1.1 request heads: the text a client sends up to the blank line, as ClientH1 hands it to
// parse_request, then the lookups and hop-by-hop filtering done on the parsed head.
#include <cstddef>
#include <cstdint>

#include "core/http1.h"

using namespace stepflow::http1;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Head head;
    head.raw.assign(reinterpret_cast<const char*>(data), size);
    Limits limits;
    limits.max_headers = 20;
    if (parse_request(head, limits)) return 0;
    (void)head.get("host");
    (void)head.has("content-length");
    HopByHop hop(head);
    size_t kept = 0;
    for (const auto& h : head.headers) kept += hop.contains(h) ? 0 : 1;
    (void)kept;
    return 0;
}
