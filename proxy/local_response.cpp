#include "proxy/local_response.h"

#include <event2/buffer.h>
#include <simdjson.h>

#include "proxy/log.h"

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

namespace {

const char* miss_reason(PinnedMiss m) {
    switch (m) {
    case PinnedMiss::UnknownInstance: return "unknown-instance";
    case PinnedMiss::NotServing: return "not-serving";
    case PinnedMiss::ConnectFailed: return "connect-failed";
    default: return "unknown";
    }
}

std::string instance_unavailable(std::string_view id_json, std::string_view instance, const char* reason) {
    std::string data = "\"instanceId\":" + json_string(instance) + ",\"reason\":" + json_string(reason);
    return jsonrpc_error(id_json, -32000, "Instance not available", data);
}

}  // namespace

LocalAnswer answer_routing_miss(const RouteOutcome& miss, std::string_view id_json) {
    if (miss.kind == RouteOutcome::PinnedMiss)
        return {503, instance_unavailable(id_json, miss.pinned_id, miss_reason(miss.miss)), true};
    return {503, jsonrpc_error(id_json, -32000, "No healthy instance available", ""), true};
}

LocalAnswer answer_exchange_failure(int status, const char* why, Decision decision, std::string_view pinned_id) {
    if (status == 503 && decision == Decision::Pinned) return {503, instance_unavailable("null", pinned_id, "connect-failed"), true};
    if (status == 503)
        return {503, jsonrpc_error("null", -32000, "No healthy instance available", "\"reason\":" + json_string(why)), true};
    return {status, jsonrpc_error("null", -32000, http1::status_reason(status), "\"reason\":" + json_string(why)), false};
}

}  // namespace stepflow
