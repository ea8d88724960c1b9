// Kubernetes EndpointSlice or v1 Endpoints decoding (which one is set at compile time by
// FUZZ_K8S_KIND): the first line is a list response, every further line a watch event, applied to
// a SliceStore as discovery does, which then computes the endpoint set for three port choices.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <simdjson.h>

#include "discovery/k8s_objects.h"
#include "discovery/k8s_slice_store.h"

using namespace stepflow;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static simdjson::dom::parser parser;
    constexpr K8sKind kind = K8sKind::FUZZ_K8S_KIND;
    std::string_view text(reinterpret_cast<const char*>(data), size);
    SliceStore store;
    std::string error;
    bool first = true;
    while (!text.empty()) {
        size_t nl = text.find('\n');
        std::string_view line = text.substr(0, nl);
        text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
        if (first) {
            first = false;
            K8sListPage page;
            if (decode_list(parser, line, kind, page, error)) store.replace(std::move(page.items));
            else (void)decode_status_message(parser, line);
            continue;
        }
        K8sWatchEvent ev;
        if (!decode_watch_event(parser, line, kind, ev, error)) continue;
        (void)to_string(ev.type);
        if (ev.type == K8sWatchEvent::Type::Added || ev.type == K8sWatchEvent::Type::Modified)
            store.upsert(std::move(ev.object));
        else if (ev.type == K8sWatchEvent::Type::Deleted)
            store.remove(ev.object.name);
    }
    std::vector<Endpoint> endpoints;
    PortSelector any, by_name, by_number;
    by_name.name = "http";
    by_number.number = 8080;
    for (const PortSelector* port : {&any, &by_name, &by_number}) {
        endpoints.clear();
        (void)store.endpoints(*port, endpoints, error);
    }
    return 0;
}
