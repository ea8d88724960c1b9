// The JSON-RPC id taken from a request body for the balancer's own error answers. Whatever the
// body, the answer built around the id must itself be valid JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <event2/buffer.h>
#include <simdjson.h>

#include "proxy/local_response.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    evbuffer* body = evbuffer_new();
    evbuffer_add(body, data, size);
    std::string id = stepflow::jsonrpc_id_of(body);
    evbuffer_free(body);
    std::string answer = stepflow::jsonrpc_error(id, -32000, "no worker available", "\"retryAfter\":1");
    static simdjson::dom::parser parser;
    simdjson::dom::element doc;
    if (parser.parse(answer).get(doc) != simdjson::SUCCESS) std::abort();
    return 0;
}
