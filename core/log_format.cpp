#include "core/log_format.h"

#include "core/utf8.h"

namespace stepflow::log {

// Room for n bytes at p and, after them, for everything else the line foresaw. Sized to the
// line, not doubled: `out` may hold a whole batch of earlier lines.
char* LineWriter::make_room(char* p, size_t n) {
    size_t used = size_t(p - out_.data());
    size_t want = used + n + expect_;
    if (out_.size() < want) out_.resize(want);
    return out_.data() + used;
}

// s, already copied at p, has a byte that needs an escape or is not ASCII: written again,
// escaped, well-formed UTF-8 as it is and the rest as "\ufffd".
char* LineWriter::escape_slow(char* p, std::string_view s) {
    static constexpr char hex[] = "0123456789abcdef";
    p = make_room(p, 6 * s.size());  // "\u00XX" or "\ufffd" at most per byte
    auto* bytes = reinterpret_cast<const unsigned char*>(s.data());
    for (size_t i = 0; i < s.size(); ++i) {
        unsigned char c = bytes[i];
        if (c >= 0x80) {
            utf8::Sequence q = utf8::next(bytes + i, s.size() - i);
            if (q.ok) {
                std::memcpy(p, bytes + i, q.size);
                p += q.size;
            } else {
                p = put(p, "\\ufffd");
            }
            i += q.size - 1;
            continue;
        }
        if (c >= 0x20 && c != '"' && c != '\\') {
            *p++ = char(c);
            continue;
        }
        *p++ = '\\';
        switch (c) {
        case '"': *p++ = '"'; break;
        case '\\': *p++ = '\\'; break;
        case '\n': *p++ = 'n'; break;
        case '\r': *p++ = 'r'; break;
        case '\t': *p++ = 't'; break;
        default:
            p = put(p, "u00");
            *p++ = hex[c >> 4];
            *p++ = hex[c & 15];
        }
    }
    return p;
}

// NaN, infinities, huge values and near-ties: std::to_chars rounds the exact binary value as
// printf does. 352: the longest fixed form of a double (about 309 digits) and 3 decimals.
char* LineWriter::fixed3_slow(char* p, double v) {
    p = make_room(p, 352);
    return std::to_chars(p, p + 352, v, std::chars_format::fixed, 3).ptr;
}

}  // namespace stepflow::log
