#include "proxy/local_response.h"

#include <event2/buffer.h>
#include <simdjson.h>

#include "core/log.h"

namespace stepflow {

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
    simdjson::dom::parser parser;
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
    simdjson::dom::parser parser;
    simdjson::dom::object obj;
    if (parser.parse(body.data(), body.size()).get(obj) != simdjson::SUCCESS) return 0;
    int64_t code = 0;
    if (obj.at_pointer("/error/code").get(code) != simdjson::SUCCESS) return 0;
    return code;
}

}  // namespace stepflow
