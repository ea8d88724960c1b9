// HTTP/1.1 response heads from a worker. The first byte says whether the request was a HEAD
// (which changes how the body is framed); the rest is the head's text.
#include <cstddef>
#include <cstdint>

#include "proxy/http1.h"

using namespace stepflow::http1;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    bool request_was_head = data[0] & 1;
    Head head;
    head.raw.assign(reinterpret_cast<const char*>(data) + 1, size - 1);
    if (parse_response(head, request_was_head)) return 0;
    (void)head.get("content-type");
    HopByHop hop(head);
    for (const auto& h : head.headers) (void)hop.contains(h);
    (void)status_reason(head.status);
    return 0;
}
