// Trimming, the one way for header values, flag lists and key files alike.
#pragma once

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

}  // namespace stepflow
