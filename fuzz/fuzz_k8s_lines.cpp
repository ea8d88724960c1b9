// The list/watch line splitter: the de-chunked watch stream, cut into reads at arbitrary points
// (the first byte sets the read size). Every line handed on is whole: non-empty, no newline.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "discovery/k8s_line_splitter.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    size_t step = size_t(data[0]) + 1;
    ++data;
    --size;
    stepflow::LineSplitter splitter(512);  // small, so the too-long-line path is reached
    size_t lines = 0;
    auto on_line = [&](std::string_view line) {
        if (line.empty() || line.find('\n') != std::string_view::npos) std::abort();
        return ++lines % 7 != 0;  // sometimes stop early, leaving the rest buffered
    };
    for (size_t at = 0; at < size; at += step) {
        size_t n = size - at < step ? size - at : step;
        if (!splitter.feed(std::string_view(reinterpret_cast<const char*>(data) + at, n), on_line)) break;
    }
    return 0;
}
