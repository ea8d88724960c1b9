// HTTP/1.1 response heads from a worker. The first byte says whether the request was a HEAD
// (which changes how the body is framed); the rest is the head's text.
//
// Beyond "does not crash": a head that parses is relayed, so what the balancer would write to an
// HTTP/1.1 client (the end-to-end fields, through write_response_head) must parse again to the
// same status, reason and fields, and no field may hold a CR, LF or NUL (which would let a worker
// write a header of its choosing into the client's response). A violation aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "core/http1.h"

using namespace stepflow::http1;

namespace {

bool has_break(std::string_view s) { return s.find_first_of(std::string_view("\r\n\0", 3)) != std::string_view::npos; }

void require(bool ok) {
    if (!ok) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    bool request_was_head = data[0] & 1;
    Head head;
    head.raw.assign(reinterpret_cast<const char*>(data) + 1, size - 1);
    if (parse_response(head, request_was_head)) return 0;
    (void)head.get("content-type");
    (void)status_reason(head.status);

    // What the exchange passes on: the end-to-end fields, as parsed.
    HopByHop hop(head);
    std::vector<Header> relayed;
    for (const auto& h : head.headers)
        if (!hop.contains(h)) relayed.push_back(h);
    require(!has_break(head.reason));
    for (const auto& h : relayed) require(!h.name.empty() && !has_break(h.name) && !has_break(h.value));

    Head again;
    write_response_head(again.raw, head.status, head.reason, relayed);
    again.raw.append("\r\n");
    require(!parse_response(again, request_was_head));
    require(again.status == head.status);
    require(head.reason.empty() || again.reason == head.reason);
    require(again.headers.size() == relayed.size());
    for (size_t i = 0; i < relayed.size(); ++i)
        require(again.headers[i].name == relayed[i].name && again.headers[i].value == relayed[i].value);
    return 0;
}
