// Trimming, the one way for header values, flag lists and key files alike; percent-decoding.
#pragma once

#include <string>
#include <string_view>

namespace stepflow {

// HTTP's optional whitespace (RFC 9110 §5.6.3): space and horizontal tab.
constexpr bool is_ows(char c) { return c == ' ' || c == '\t'; }
// What isspace() accepts in the C locale.
constexpr bool is_ascii_space(char c) {
    return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\v' || c == '\f';
}

// `s` without the characters `strip` accepts at either end (by default space and tab).
constexpr std::string_view trim(std::string_view s, bool (*strip)(char) = is_ows) {
    while (!s.empty() && strip(s.front())) s.remove_prefix(1);
    while (!s.empty() && strip(s.back())) s.remove_suffix(1);
    return s;
}

// A hexadecimal digit's value, -1 for any other character.
constexpr int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// `s` with each %XX decoded (W3C Baggage values, gRPC's grpc-message); any other '%' stays.
inline std::string percent_decode(std::string_view s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '%' && i + 2 < s.size() && hex_digit(s[i + 1]) >= 0 && hex_digit(s[i + 2]) >= 0) {
            out += char(hex_digit(s[i + 1]) * 16 + hex_digit(s[i + 2]));
            i += 2;
        } else {
            out += s[i];
        }
    }
    return out;
}

}  // namespace stepflow
