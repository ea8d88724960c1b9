// A worker's /health response body, as the health probe decodes it.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "discovery/health_probe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string_view body(reinterpret_cast<const char*>(data), size);
    stepflow::HealthResult r = stepflow::parse_health_body(200, body);
    (void)r;
    return 0;
}
