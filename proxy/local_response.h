// Answers the balancer writes itself (no worker involved): JSON-RPC error bodies for 503s and
// plain errors for malformed requests.
#pragma once

#include <string>
#include <string_view>

#include "proxy/exchange.h"

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

// The balancer's own answer to a request it could not (or can no longer) pass to a worker:
// always a JSON-RPC error body; 503s carry Retry-After.
struct LocalAnswer {
    int status = 503;
    std::string body;
    bool retry_after = true;
};

// A routing miss: pinned to an unavailable instance, or no instance takes new work.
LocalAnswer answer_routing_miss(const RouteOutcome& miss, std::string_view id_json);
// An exchange that failed before the worker's response head (connect failure, reset, timeout).
LocalAnswer answer_exchange_failure(int status, const char* why, Decision decision, std::string_view pinned_id);

}  // namespace stepflow
