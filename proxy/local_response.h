// JSON-RPC helpers for the answers the balancer writes itself (see failure_policy.h for which).
#pragma once

#include <string>
#include <string_view>

#include <cstdint>

struct evbuffer;

namespace stepflow {

// The JSON-RPC `id` of a request body as raw JSON ("7", "\"abc\"", "null"); "null" when the body
// is not a JSON-RPC request object.
std::string jsonrpc_id_of(evbuffer* body);

// {"jsonrpc":"2.0","id":<id>,"error":{"code":<code>,"message":<message>,"data":{...}}}
// `data_fields` is a comma-separated list of JSON members, without braces (may be empty).
std::string jsonrpc_error(std::string_view id_json, int code, std::string_view message, std::string_view data_fields);

// A JSON string literal for arbitrary bytes, quotes included.
std::string json_string(std::string_view s);

// The `error.code` of a JSON-RPC error response body; 0 when there is none.
int64_t jsonrpc_error_code_of(std::string_view body);

}  // namespace stepflow
