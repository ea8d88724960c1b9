#include "proxy/local_response.h"

#include <event2/buffer.h>
#include <simdjson.h>

#include "core/log.h"

namespace stepflow {
namespace {

// One parser per thread, reused: a parser allocates its buffers on first use and keeps them. Bodies
// larger than kKeptCapacity get a parser of their own, so a thread never holds on to an upload's size.
constexpr size_t kKeptCapacity = 64 * 1024;

simdjson::dom::parser& thread_parser() {
    thread_local simdjson::dom::parser parser{kKeptCapacity};
    return parser;
}

}  // namespace

std::string json_string(std::string_view s) {
    std::string out = "\"";
    log::append_json_escaped(out, s);
    out += '"';
    return out;
}

std::string jsonrpc_id_of(evbuffer* body) {
    size_t len = evbuffer_get_length(body);
    if (len == 0) return "null";
    const char* data = reinterpret_cast<const char*>(evbuffer_pullup(body, -1));
    simdjson::dom::parser own;
    simdjson::dom::parser& parser = len <= kKeptCapacity ? thread_parser() : own;
    simdjson::dom::object obj;
    if (parser.parse(data, len).get(obj) != simdjson::SUCCESS) return "null";
    simdjson::dom::element id;
    if (obj["id"].get(id) != simdjson::SUCCESS) return "null";
    if (id.is_string()) return json_string(std::string_view(id));
    if (id.is_int64()) return std::to_string(int64_t(id));
    if (id.is_uint64()) return std::to_string(uint64_t(id));
    return "null";  // JSON-RPC ids are strings or integers; anything else is not echoed
}

std::string jsonrpc_error(std::string_view id_json, int code, std::string_view message, std::string_view data_fields) {
    std::string out = "{\"jsonrpc\":\"2.0\",\"id\":";
    out.append(id_json);
    out.append(",\"error\":{\"code\":");
    out.append(std::to_string(code));
    out.append(",\"message\":");
    out.append(json_string(message));
    if (!data_fields.empty()) {
        out.append(",\"data\":{");
        out.append(data_fields);
        out += '}';
    }
    out.append("}}");
    return out;
}

int64_t jsonrpc_error_code_of(std::string_view body) {
    simdjson::dom::parser own;
    simdjson::dom::parser& parser = body.size() <= kKeptCapacity ? thread_parser() : own;
    simdjson::dom::object obj;
    if (parser.parse(body.data(), body.size()).get(obj) != simdjson::SUCCESS) return 0;
    int64_t code = 0;
    if (obj.at_pointer("/error/code").get(code) != simdjson::SUCCESS) return 0;
    return code;
}

}  // namespace stepflow
