// Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF) is what
// JSON text (RFC 8259 §8.1) and protobuf string fields must hold. Request targets and header
// values may carry any byte from 0x80 up (obs-text), so what the balancer copies from a request
// into a log line, a JSON answer or a span goes through here: an ill-formed sequence is shown
// as U+FFFD, one per maximal subpart (Unicode §3.9, as WHATWG's decoder and Python's "replace").
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace stepflow::utf8 {

struct Sequence {
    size_t size;  // bytes taken: the whole sequence, or the ill-formed maximal subpart
    bool ok;
};

// The sequence that starts at s[0] (n > 0 bytes left).
inline Sequence next(const unsigned char* s, size_t n) {
    unsigned char c = s[0];
    if (c < 0x80) return {1, true};
    size_t follow;
    unsigned char lo = 0x80, hi = 0xbf;  // the range of the first continuation byte
    if (c >= 0xc2 && c <= 0xdf) {
        follow = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
        follow = 2;
        if (c == 0xe0) lo = 0xa0;       // overlong
        else if (c == 0xed) hi = 0x9f;  // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
        follow = 3;
        if (c == 0xf0) lo = 0x90;       // overlong
        else if (c == 0xf4) hi = 0x8f;  // above U+10FFFF
    } else {
        return {1, false};  // a continuation byte, C0/C1 (overlong) or F5..FF
    }
    for (size_t i = 1; i <= follow; ++i) {
        if (i >= n || s[i] < lo || s[i] > hi) return {i, false};
        lo = 0x80;
        hi = 0xbf;
    }
    return {follow + 1, true};
}

// Whether s is all ASCII: eight bytes at a time, the usual answer for a path or a User-Agent.
inline bool ascii(std::string_view s) {
    const char* p = s.data();
    size_t n = s.size();
    uint64_t high = 0;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        high |= w;
    }
    for (; n; ++p, --n) high |= uint64_t(static_cast<unsigned char>(*p));
    return (high & 0x8080808080808080ull) == 0;
}

inline bool valid(std::string_view s) {
    if (ascii(s)) return true;
    auto* p = reinterpret_cast<const unsigned char*>(s.data());
    for (size_t i = 0; i < s.size();) {
        Sequence q = next(p + i, s.size() - i);
        if (!q.ok) return false;
        i += q.size;
    }
    return true;
}

// Appends s to out with U+FFFD (EF BF BD) in place of each ill-formed maximal subpart.
inline void append_well_formed(std::string& out, std::string_view s) {
    auto* p = reinterpret_cast<const unsigned char*>(s.data());
    for (size_t i = 0; i < s.size();) {
        Sequence q = next(p + i, s.size() - i);
        if (q.ok) out.append(s.data() + i, q.size);
        else out.append("\xef\xbf\xbd");
        i += q.size;
    }
}

// out = s, with U+FFFD as append_well_formed puts it; s is copied as it is when well-formed.
inline void assign_well_formed(std::string& out, std::string_view s) {
    if (valid(s)) {
        out.assign(s);
        return;
    }
    out.clear();
    append_well_formed(out, s);
}

}  // namespace stepflow::utf8
