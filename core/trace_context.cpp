#include "core/trace_context.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <random>

namespace stepflow::trace {
namespace {

Settings g_settings;

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;  // upper case is invalid in traceparent
}

bool parse_hex(std::string_view s, uint8_t* out) {
    bool nonzero = false;
    for (size_t i = 0; i < s.size() / 2; ++i) {
        int hi = hex_value(s[2 * i]), lo = hex_value(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        out[i] = static_cast<uint8_t>(hi << 4 | lo);
        nonzero |= out[i] != 0;
    }
    return nonzero;
}

// xoshiro256** seeded once per thread: ids must be unique, not secret.
struct Generator {
    uint64_t s[4];
    Generator() {
        std::random_device rd;
        for (auto& w : s) w = (uint64_t(rd()) << 32) ^ rd();
    }
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t next() {
        uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 45);
        return result;
    }
};
thread_local Generator t_generator;

void fill(uint8_t* out, size_t n) {
    do {
        for (size_t i = 0; i < n; i += 8) {
            uint64_t v = t_generator.next();
            std::memcpy(out + i, &v, 8);
        }
    } while (std::all_of(out, out + n, [](uint8_t b) { return b == 0; }));
}

bool ratio_sampled(const uint8_t trace_id[16], double ratio) {
    if (ratio >= 1.0) return true;
    if (ratio <= 0.0) return false;
    // The trace id's low 8 bytes as a number, compared to ratio * 2^64, as the SDKs do: every
    // replica with the same ratio decides the same way for one trace.
    uint64_t v = 0;
    for (int i = 8; i < 16; ++i) v = v << 8 | trace_id[i];
    return double(v) < ratio * 18446744073709551616.0;
}

}  // namespace

bool parse_traceparent(std::string_view v, Ids& out) {
    // version 2, trace-id 32, parent-id 16, flags 2, three dashes = 55
    if (v.size() < 55) return false;
    if (v[2] != '-' || v[35] != '-' || v[52] != '-') return false;
    int v_hi = hex_value(v[0]), v_lo = hex_value(v[1]);
    if (v_hi < 0 || v_lo < 0 || (v_hi == 15 && v_lo == 15)) return false;
    if (v_hi == 0 && v_lo == 0 && v.size() != 55) return false;  // version 00 has exactly these fields
    if (v.size() > 55 && v[55] != '-') return false;
    if (!parse_hex(v.substr(3, 32), out.trace_id)) return false;
    if (!parse_hex(v.substr(36, 16), out.span_id)) return false;
    int f_hi = hex_value(v[53]), f_lo = hex_value(v[54]);
    if (f_hi < 0 || f_lo < 0) return false;
    out.flags = static_cast<uint8_t>(f_hi << 4 | f_lo);
    return true;
}

// "00" .. "ff": a byte's two characters in one lookup and one 2-byte store (ids are converted
// four times per traced request).
constexpr auto kHexPairs = [] {
    std::array<char, 512> pairs{};
    constexpr char digits[] = "0123456789abcdef";
    for (size_t b = 0; b < 256; ++b) {
        pairs[2 * b] = digits[b >> 4];
        pairs[2 * b + 1] = digits[b & 15];
    }
    return pairs;
}();

void to_hex(const uint8_t* bytes, size_t n, char* out) {
    for (size_t i = 0; i < n; ++i) std::memcpy(out + 2 * i, &kHexPairs[2 * size_t(bytes[i])], 2);
}

void format_traceparent(const uint8_t trace_id[16], const uint8_t span_id[8], uint8_t flags, char out[55]) {
    out[0] = '0';
    out[1] = '0';
    out[2] = '-';
    to_hex(trace_id, 16, out + 3);
    out[35] = '-';
    to_hex(span_id, 8, out + 36);
    out[52] = '-';
    to_hex(&flags, 1, out + 53);
}

void new_trace_id(uint8_t out[16]) { fill(out, 16); }
void new_span_id(uint8_t out[8]) { fill(out, 8); }

bool parse_sampler(std::string_view name, Sampler& out) {
    static constexpr std::pair<std::string_view, Sampler> names[] = {
        {"always_on", Sampler::AlwaysOn},
        {"always_off", Sampler::AlwaysOff},
        {"traceidratio", Sampler::TraceIdRatio},
        {"parentbased_always_on", Sampler::ParentAlwaysOn},
        {"parentbased_always_off", Sampler::ParentAlwaysOff},
        {"parentbased_traceidratio", Sampler::ParentTraceIdRatio}};
    for (auto& [n, s] : names)
        if (n == name) { out = s; return true; }
    return false;
}

const char* to_string(Sampler s) {
    switch (s) {
    case Sampler::AlwaysOn: return "always_on";
    case Sampler::AlwaysOff: return "always_off";
    case Sampler::TraceIdRatio: return "traceidratio";
    case Sampler::ParentAlwaysOn: return "parentbased_always_on";
    case Sampler::ParentAlwaysOff: return "parentbased_always_off";
    case Sampler::ParentTraceIdRatio: return "parentbased_traceidratio";
    }
    return "parentbased_always_on";
}

void configure(const Settings& s) { g_settings = s; }
const Settings& settings() { return g_settings; }

bool sample(const uint8_t trace_id[16], const Ids* parent) {
    const Settings& s = g_settings;
    switch (s.sampler) {
    case Sampler::AlwaysOn: return true;
    case Sampler::AlwaysOff: return false;
    case Sampler::TraceIdRatio: return ratio_sampled(trace_id, s.ratio);
    case Sampler::ParentAlwaysOn: return parent ? (parent->flags & 1) != 0 : true;
    case Sampler::ParentAlwaysOff: return parent ? (parent->flags & 1) != 0 : false;
    case Sampler::ParentTraceIdRatio: return parent ? (parent->flags & 1) != 0 : ratio_sampled(trace_id, s.ratio);
    }
    return true;
}

}  // namespace stepflow::trace
