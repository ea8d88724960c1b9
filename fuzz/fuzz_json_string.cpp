// JSON strings the balancer writes around bytes it did not choose (a path in a log line, a
// header value quoted in an error answer): the text must be valid JSON, hence UTF-8, whatever
// the bytes, and bytes that already are UTF-8 must come back unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include <simdjson.h>

#include "core/utf8.h"
#include "proxy/local_response.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    std::string quoted = stepflow::json_string(in);
    static simdjson::dom::parser parser;  // checks UTF-8 as it parses
    simdjson::dom::element doc;
    if (parser.parse(quoted).get(doc) != simdjson::SUCCESS) std::abort();
    std::string_view back;
    if (doc.get(back) != simdjson::SUCCESS) std::abort();
    if (stepflow::utf8::valid(in) != (back == in)) std::abort();
    // What is not UTF-8 shows U+FFFD: as many bytes as the input at most, three per replacement.
    std::string fixed;
    stepflow::utf8::append_well_formed(fixed, in);
    if (back != fixed || !stepflow::utf8::valid(fixed)) std::abort();
    return 0;
}
