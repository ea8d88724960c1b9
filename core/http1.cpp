#include "core/http1.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>

#include <event2/buffer.h>

// SSE2 is part of x86-64; elsewhere the field scanner reads 8-byte words (SWAR).
#if defined(__SSE2__) && defined(__x86_64__)
#define STEPFLOW_HTTP1_SSE2 1
#include <emmintrin.h>
#endif

#include "core/text.h"

namespace stepflow::http1 {
namespace {

constexpr std::array<bool, 256> make_tchar_table() {
    std::array<bool, 256> t{};
    for (int c = '0'; c <= '9'; ++c) t[size_t(c)] = true;
    for (int c = 'a'; c <= 'z'; ++c) t[size_t(c)] = true;
    for (int c = 'A'; c <= 'Z'; ++c) t[size_t(c)] = true;
    for (char c : std::string_view("!#$%&'*+-.^_`|~")) t[static_cast<unsigned char>(c)] = true;
    return t;
}
constexpr std::array<bool, 256> kTchar = make_tchar_table();

bool is_tchar(unsigned char c) { return kTchar[c]; }

bool is_token(std::string_view s) {
    if (s.empty()) return false;
    for (unsigned char c : s)
        if (!is_tchar(c)) return false;
    return true;
}

// Field values: VCHAR, obs-text, SP and HTAB; never CR, LF or NUL.
bool valid_field_value(std::string_view v) {
    for (unsigned char c : v)
        if ((c < 0x20 && c != '\t') || c == 0x7f) return false;
    return true;
}

bool parse_decimal(std::string_view s, uint64_t& out) {
    if (s.empty() || s.size() > 18) return false;
    uint64_t v = 0;
    for (char c : s) {
        if (c < '0' || c > '9') return false;
        v = v * 10 + uint64_t(c - '0');
    }
    out = v;
    return true;
}

// Calls fn(element) for each comma-separated element of a list-valued header, trimmed.
template <class Fn>
void for_each_element(std::string_view v, Fn fn) {
    while (!v.empty()) {
        size_t comma = v.find(',');
        std::string_view item = trim(v.substr(0, comma));
        if (!item.empty()) fn(item);
        if (comma == std::string_view::npos) break;
        v.remove_prefix(comma + 1);
    }
}

// Byte classes for the one-pass field scanner below.
constexpr uint8_t kToken = 1;  // tchar: may appear in a field name
constexpr uint8_t kValue = 2;  // VCHAR, obs-text, SP, HTAB: may appear in a field value
constexpr std::array<uint8_t, 256> make_class_table() {
    std::array<uint8_t, 256> t{};
    for (int c = 0; c < 256; ++c) {
        if (kTchar[size_t(c)]) t[size_t(c)] |= kToken;
        if ((c >= 0x20 && c != 0x7f) || c == '\t') t[size_t(c)] |= kValue;
    }
    return t;
}
constexpr std::array<uint8_t, 256> kClass = make_class_table();

// Eight bytes at a time (SWAR): a word is loaded with memcpy (unaligned, no aliasing issue).
constexpr uint64_t kOnes = 0x0101010101010101ull, kHighs = 0x8080808080808080ull;
inline uint64_t load8(const unsigned char* p) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    return w;
}
// Non-zero when some byte of `w` is below `n` (n <= 0x80); the lowest flagged byte is exact.
constexpr uint64_t has_below(uint64_t w, uint8_t n) { return (w - kOnes * n) & ~w & kHighs; }

#if defined(STEPFLOW_HTTP1_SSE2)
inline __m128i load16(const unsigned char* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
// 0xff in each lane of `v` that lies in [lo, hi] (unsigned: moved down by lo, then compared
// through an unsigned minimum, which SSE2 has where it lacks an unsigned compare).
inline __m128i in_range(__m128i v, unsigned char lo, unsigned char hi) {
    __m128i x = _mm_sub_epi8(v, _mm_set1_epi8(static_cast<char>(lo)));
    return _mm_cmpeq_epi8(_mm_min_epu8(x, _mm_set1_epi8(static_cast<char>(hi - lo))), x);
}
inline unsigned lanes(__m128i m) { return static_cast<unsigned>(_mm_movemask_epi8(m)); }
#endif

// Moves `p` past field-name bytes (tchar). Names are nearly always letters, digits and '-':
// sixteen of those are passed at a time, and the table finishes the name from the first other
// byte (usually the ':').
const unsigned char* skip_name(const unsigned char* p, const unsigned char* end) {
#if defined(STEPFLOW_HTTP1_SSE2)
    while (end - p >= 16) {
        __m128i v = load16(p);
        __m128i common = _mm_or_si128(_mm_or_si128(in_range(_mm_or_si128(v, _mm_set1_epi8(0x20)), 'a', 'z'),
                                                   in_range(v, '0', '9')),
                                      _mm_cmpeq_epi8(v, _mm_set1_epi8('-')));
        unsigned ok = lanes(common);
        if (ok != 0xffff) {
            p += __builtin_ctz(~ok);
            break;
        }
        p += 16;
    }
#endif
    while (p < end && (kClass[*p] & kToken)) ++p;
    return p;
}

// Moves `p` past field-value bytes. Most of a value is VCHAR, SP and obs-text (no byte below
// 0x20, none 0x7f): with SSE2 the first other byte of sixteen is found at once, and is the CR
// unless it is an HTAB (allowed, stepped over); without, eight at a time (SWAR) and the word
// holding the CR byte by byte.
const unsigned char* skip_value(const unsigned char* p, const unsigned char* end) {
#if defined(STEPFLOW_HTTP1_SSE2)
    while (end - p >= 16) {
        __m128i v = load16(p);
        __m128i control = _mm_or_si128(_mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v),
                                       _mm_cmpeq_epi8(v, _mm_set1_epi8(0x7f)));
        unsigned stop = lanes(control);
        if (stop == 0) {
            p += 16;
            continue;
        }
        p += __builtin_ctz(stop);
        if (*p != '\t') return p;
        ++p;
    }
#else
    while (end - p >= 8) {
        uint64_t w = load8(p);
        if (has_below(w, 0x20) | has_below(w ^ (kOnes * 0x7f), 1)) break;
        p += 8;
    }
#endif
    while (p < end && (kClass[*p] & kValue)) ++p;
    return p;
}

Error split_lines_checked(Head& head, std::string_view& start_line, const Limits& limits);

// Splits head.raw into the start line and header fields. Every line must end in CRLF. Heads
// are split on every request and response, so well-formed ones take one pass over the bytes
// with a class table; anything unusual is handed to split_lines_checked, which finds and names
// the fault.
Error split_lines(Head& head, std::string_view& start_line, const Limits& limits) {
    std::string_view raw(head.raw);
    size_t eol = raw.find("\r\n");
    if (eol == std::string_view::npos) return split_lines_checked(head, start_line, limits);
    start_line = raw.substr(0, eol);
    head.headers.clear();
    if (head.headers.capacity() == 0) head.headers.reserve(16);
    const auto* p = reinterpret_cast<const unsigned char*>(raw.data()) + eol + 2;
    const auto* end = reinterpret_cast<const unsigned char*>(raw.data()) + raw.size();
    while (true) {
        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n') return {};  // the blank line
        const unsigned char* name = p;
        p = skip_name(p, end);
        if (p == name || p == end || *p != ':') break;
        const unsigned char* name_end = p++;
        while (p < end && (*p == ' ' || *p == '\t')) ++p;
        const unsigned char* value = p;
        p = skip_value(p, end);
        if (end - p < 2 || p[0] != '\r' || p[1] != '\n') break;
        const unsigned char* value_end = p;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) --value_end;
        p += 2;
        if (static_cast<int>(head.headers.size()) >= limits.max_headers) break;
        std::string_view n(reinterpret_cast<const char*>(name), size_t(name_end - name));
        head.headers.push_back({n, std::string_view(reinterpret_cast<const char*>(value), size_t(value_end - value)),
                                classify(n)});
    }
    return split_lines_checked(head, start_line, limits);
}

Error split_lines_checked(Head& head, std::string_view& start_line, const Limits& limits) {
    std::string_view rest(head.raw);
    size_t eol = rest.find("\r\n");
    if (eol == std::string_view::npos) return {400, "bad start line"};
    start_line = rest.substr(0, eol);
    rest.remove_prefix(eol + 2);
    head.headers.clear();
    while (true) {
        eol = rest.find("\r\n");
        if (eol == std::string_view::npos) return {400, "bad header line"};
        std::string_view line = rest.substr(0, eol);
        rest.remove_prefix(eol + 2);
        if (line.empty()) break;
        if (line.front() == ' ' || line.front() == '\t') return {400, "obsolete header folding"};
        size_t colon = line.find(':');
        if (colon == std::string_view::npos) return {400, "header line without colon"};
        std::string_view name = line.substr(0, colon);
        if (!is_token(name)) return {400, "bad header name"};
        std::string_view value = trim(line.substr(colon + 1));
        if (!valid_field_value(value)) return {400, "bad header value"};
        if (static_cast<int>(head.headers.size()) >= limits.max_headers) return {431, "too many header fields"};
        head.headers.push_back({name, value, classify(name)});
    }
    return {};
}

// Shared by requests and responses: Content-Length, Transfer-Encoding, Connection.
Error read_framing_headers(Head& head, bool& has_te, bool& has_cl) {
    has_te = has_cl = false;
    bool chunked_last = false, close = false, keep_alive = false;
    for (const auto& h : head.headers) {
        if (h.field == Field::ContentLength) {
            uint64_t v = 0;
            if (!parse_decimal(h.value, v)) return {400, "bad content-length"};
            if (has_cl && v != head.content_length) return {400, "conflicting content-length"};
            has_cl = true;
            head.content_length = v;
        } else if (h.field == Field::TransferEncoding) {
            has_te = true;
            // Only "chunked", once, as the final coding is something we can frame.
            int count = 0;
            bool ok = true;
            for_each_element(h.value, [&](std::string_view c) {
                ++count;
                if (!iequals(c, "chunked")) ok = false;
            });
            if (!ok || count != 1 || chunked_last) return {501, "unsupported transfer-encoding"};
            chunked_last = true;
        } else if (h.field == Field::Connection) {
            for_each_element(h.value, [&](std::string_view c) {
                if (iequals(c, "close")) close = true;
                else if (iequals(c, "keep-alive")) keep_alive = true;
            });
        }
    }
    if (has_te && !chunked_last) return {400, "bad transfer-encoding"};
    head.keep_alive = close ? false : (head.version_minor == 1 ? true : keep_alive);
    return {};
}

}  // namespace

namespace {
constexpr std::array<unsigned char, 256> make_lower_table() {
    std::array<unsigned char, 256> t{};
    for (int c = 0; c < 256; ++c) t[size_t(c)] = static_cast<unsigned char>(c >= 'A' && c <= 'Z' ? c + 32 : c);
    return t;
}
constexpr std::array<unsigned char, 256> kLower = make_lower_table();
}  // namespace

namespace {
// `w` with its bytes 'A'..'Z' made lower case (others unchanged).
inline uint64_t lower8(uint64_t w) {
    uint64_t seven = w & ~kHighs;  // adding below cannot carry into the next byte
    uint64_t upper = (seven + kOnes * (0x80 - 'A')) & ~(seven + kOnes * (0x80 - 'Z' - 1)) & ~w & kHighs;
    return w | (upper >> 2);
}
}  // namespace

bool iequals_bytes(const char* a, const char* b, size_t n) {
    const auto* x = reinterpret_cast<const unsigned char*>(a);
    const auto* y = reinterpret_cast<const unsigned char*>(b);
    if (n >= 8) {  // whole words, the last one overlapping the one before
        for (size_t i = 0; i + 8 < n; i += 8)
            if (lower8(load8(x + i)) != lower8(load8(y + i))) return false;
        return lower8(load8(x + n - 8)) == lower8(load8(y + n - 8));
    }
    for (size_t i = 0; i < n; ++i)
        if (kLower[x[i]] != kLower[y[i]]) return false;
    return true;
}

namespace {
inline uint64_t load4(const unsigned char* p) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    return w;
}

// `name` (any case) is the lower-case literal `lower`: inline, word by word, for classify(),
// which runs on every field of every head.
inline bool equals_lower(std::string_view name, std::string_view lower) {
    size_t n = lower.size();
    if (name.size() != n) return false;
    const auto* x = reinterpret_cast<const unsigned char*>(name.data());
    const auto* y = reinterpret_cast<const unsigned char*>(lower.data());
    if (n >= 8) {
        for (size_t i = 0; i + 8 < n; i += 8)
            if (lower8(load8(x + i)) != load8(y + i)) return false;
        return lower8(load8(x + n - 8)) == load8(y + n - 8);
    }
    if (n >= 4) return lower8(load4(x)) == load4(y) && lower8(load4(x + n - 4)) == load4(y + n - 4);
    for (size_t i = 0; i < n; ++i)
        if (kLower[x[i]] != y[i]) return false;
    return true;
}
}  // namespace

Field classify(std::string_view name) {
    auto is = [&](std::string_view lower) { return equals_lower(name, lower); };
    switch (name.size()) {
    case 2: return is("te") ? Field::TE : Field::Other;
    case 4: return is("host") ? Field::Host : Field::Other;
    case 6: return is("expect") ? Field::Expect : Field::Other;
    case 7: return is("trailer") ? Field::Trailer : is("upgrade") ? Field::Upgrade : Field::Other;
    case 10: return is("connection") ? Field::Connection : is("keep-alive") ? Field::KeepAlive : Field::Other;
    case 12: return is("content-type") ? Field::ContentType : Field::Other;
    case 14: return is("content-length") ? Field::ContentLength : Field::Other;
    case 15: return is("x-forwarded-for") ? Field::XForwardedFor : Field::Other;
    case 16: return is("proxy-connection") ? Field::ProxyConnection : Field::Other;
    case 17:
        return is("transfer-encoding") ? Field::TransferEncoding
               : is("x-forwarded-proto") ? Field::XForwardedProto
                                         : Field::Other;
    default: return Field::Other;
    }
}

std::string_view Head::get(std::string_view name) const {
    for (const auto& h : headers)
        if (iequals(h.name, name)) return h.value;
    return {};
}

void Head::clear() {
    std::string bytes = std::move(raw);
    std::vector<Header> fields = std::move(headers);
    *this = Head{};
    bytes.clear();
    fields.clear();
    raw = std::move(bytes);
    headers = std::move(fields);
}

bool Head::has(std::string_view name) const {
    for (const auto& h : headers)
        if (iequals(h.name, name)) return true;
    return false;
}

size_t find_head_end(evbuffer* in, size_t limit, size_t& scan_from) {
    size_t len = evbuffer_get_length(in);
    size_t start = scan_from > 3 ? scan_from - 3 : 0;
    if (start < len) {
        // Usually the whole head came in one read and sits in one chain: search it in place.
        evbuffer_iovec first;
        if (evbuffer_peek(in, -1, nullptr, &first, 1) == 1 && first.iov_len == len) {
            std::string_view bytes(static_cast<const char*>(first.iov_base), len);
            size_t at = bytes.find("\r\n\r\n", start);
            if (at != std::string_view::npos) return at + 4 > limit ? SIZE_MAX : at + 4;
            scan_from = len;
            return len >= limit ? SIZE_MAX : 0;
        }
        evbuffer_ptr from;
        evbuffer_ptr_set(in, &from, start, EVBUFFER_PTR_SET);
        evbuffer_ptr found = evbuffer_search(in, "\r\n\r\n", 4, &from);
        if (found.pos >= 0) {
            size_t end = static_cast<size_t>(found.pos) + 4;
            return end > limit ? SIZE_MAX : end;
        }
    }
    scan_from = len;
    return len >= limit ? SIZE_MAX : 0;
}

namespace {

// parse_request and check_request: the method and target, once split.
Error check_method_and_target(Head& head) {
    if (!is_token(head.method)) return {400, "bad method"};
    if (head.target.empty()) return {400, "empty request target"};
    for (unsigned char c : head.target)
        if (c <= 0x20 || c == 0x7f) return {400, "bad request target"};
    head.is_head_method = head.method == "HEAD";
    return {};
}

// parse_request and check_request: framing and Host, once the fields are split and classified.
Error check_request_fields(Head& head) {
    bool has_te, has_cl;
    if (auto e = read_framing_headers(head, has_te, has_cl)) return e;
    if (has_te && has_cl) return {400, "both content-length and transfer-encoding"};
    if (has_te && head.version_minor == 0) return {400, "transfer-encoding in HTTP/1.0"};
    head.framing = has_te ? Framing::Chunked : (has_cl && head.content_length > 0 ? Framing::Length : Framing::None);

    int hosts = 0;
    for (const auto& h : head.headers) {
        if (h.field == Field::Host) {
            ++hosts;
            head.host = h.value;
        } else if (h.field == Field::Expect) {
            if (iequals(h.value, "100-continue")) head.expect_continue = true;
        }
    }
    if (hosts > 1) return {400, "more than one Host header"};
    if (hosts == 0 && head.version_minor == 1) return {400, "missing Host header"};
    return {};
}

}  // namespace

Error parse_request(Head& head, const Limits& limits) {
    std::string_view line;
    if (auto e = split_lines(head, line, limits)) return e;

    size_t sp1 = line.find(' ');
    size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos || line.find(' ', sp2 + 1) != std::string_view::npos)
        return {400, "bad request line"};
    head.method = line.substr(0, sp1);
    head.target = line.substr(sp1 + 1, sp2 - sp1 - 1);
    std::string_view version = line.substr(sp2 + 1);
    if (auto e = check_method_and_target(head)) return e;
    if (version == "HTTP/1.1") head.version_minor = 1;
    else if (version == "HTTP/1.0") head.version_minor = 0;
    else if (version.size() == 8 && version.substr(0, 5) == "HTTP/") return {505, "unsupported HTTP version"};
    else return {400, "bad HTTP version"};
    return check_request_fields(head);
}

Error check_request(Head& head, const Limits& limits) {
    if (static_cast<int>(head.headers.size()) > limits.max_headers) return {431, "too many header fields"};
    if (auto e = check_method_and_target(head)) return e;
    head.version_minor = 1;
    return check_request_fields(head);
}

Error parse_response(Head& head, bool request_was_head) {
    std::string_view line;
    Limits loose{1024 * 1024, 1000};
    if (auto e = split_lines(head, line, loose)) return e;
    if (line.size() < 12 || line.substr(0, 7) != "HTTP/1." || (line[7] != '0' && line[7] != '1') || line[8] != ' ')
        return {502, "bad upstream status line"};
    head.version_minor = line[7] - '0';
    std::string_view code = line.substr(9, 3);
    if (!std::all_of(code.begin(), code.end(), [](char c) { return c >= '0' && c <= '9'; }))
        return {502, "bad upstream status code"};
    head.status = (code[0] - '0') * 100 + (code[1] - '0') * 10 + (code[2] - '0');
    if (head.status < 100) return {502, "bad upstream status code"};
    if (line.size() > 12 && line[12] != ' ') return {502, "bad upstream status line"};
    head.reason = line.size() > 13 ? line.substr(13) : std::string_view{};
    // The reason phrase is relayed to HTTP/1.1 clients: a CR or LF in it would start a header
    // of the worker's choosing (RFC 9112 §4: HTAB, SP, VCHAR, obs-text only).
    if (!valid_field_value(head.reason)) return {502, "bad upstream reason phrase"};

    bool has_te, has_cl;
    if (auto e = read_framing_headers(head, has_te, has_cl)) return {502, e.reason};
    if (request_was_head || head.status < 200 || head.status == 204 || head.status == 304)
        head.framing = Framing::None;
    else if (has_te)
        head.framing = Framing::Chunked;  // wins over any Content-Length (RFC 9112 §6.3)
    else if (has_cl)
        head.framing = head.content_length > 0 ? Framing::Length : Framing::None;
    else
        head.framing = Framing::UntilClose;
    if (head.framing == Framing::UntilClose) head.keep_alive = false;
    return {};
}

HopByHop::HopByHop(const Head& head) {
    for (const auto& h : head.headers)
        if (h.field == Field::Connection)
            for_each_element(h.value, [&](std::string_view c) {
                if (!iequals(c, "close") && !iequals(c, "keep-alive")) listed_.push_back(c);
            });
}

bool HopByHop::contains(const Header& h) const {
    switch (h.field) {
    case Field::Connection:
    case Field::KeepAlive:
    case Field::ProxyConnection:
    case Field::TE:
    case Field::Trailer:
    case Field::TransferEncoding:
    case Field::Upgrade: return true;
    default: break;
    }
    for (auto l : listed_)
        if (iequals(h.name, l)) return true;
    return false;
}

void BodyPump::start(Framing in_framing, uint64_t content_length, bool chunked_out) {
    framing_ = in_framing;
    chunked_out_ = chunked_out && in_framing != Framing::None;
    payload_bytes_ = 0;
    trailer_bytes_ = 0;
    error_ = "";
    switch (in_framing) {
    case Framing::None: state_ = State::Done; break;
    case Framing::Length: state_ = State::Data; remaining_ = content_length; break;
    case Framing::UntilClose: state_ = State::Data; remaining_ = UINT64_MAX; break;
    case Framing::Chunked: state_ = State::ChunkSize; break;
    }
}

BodyPump::Status BodyPump::fail(const char* why) {
    state_ = State::Failed;
    error_ = why;
    return Status::Error;
}

void BodyPump::emit_payload(evbuffer* in, evbuffer* out, size_t n, BodyTap* tap) {
    if (tap) tap->payload(in, n);
    if (chunked_out_) {
        char line[24];
        int len = std::snprintf(line, sizeof line, "%zx\r\n", n);
        evbuffer_add(out, line, static_cast<size_t>(len));
    }
    evbuffer_remove_buffer(in, out, n);
    if (chunked_out_) evbuffer_add(out, "\r\n", 2);
    payload_bytes_ += n;
}

void BodyPump::emit_end(evbuffer* out) {
    if (chunked_out_) evbuffer_add(out, "0\r\n\r\n", 5);
    state_ = State::Done;
}

void BodyPump::finish_on_close(evbuffer* out) {
    if (framing_ == Framing::UntilClose && state_ == State::Data) emit_end(out);
}

BodyPump::Status BodyPump::pump(evbuffer* in, evbuffer* out, BodyTap* tap) {
    while (true) {
        size_t avail = evbuffer_get_length(in);
        switch (state_) {
        case State::Done: return Status::Done;
        case State::Failed: return Status::Error;
        case State::Data: {
            size_t n = static_cast<size_t>(std::min<uint64_t>(avail, remaining_));
            if (n > 0) {
                emit_payload(in, out, n, tap);
                if (framing_ == Framing::Length) remaining_ -= n;
            }
            if (framing_ == Framing::Length && remaining_ == 0) {
                emit_end(out);
                return Status::Done;
            }
            return Status::More;
        }
        case State::ChunkSize: {
            size_t eol_len = 0;
            evbuffer_ptr eol = evbuffer_search_eol(in, nullptr, &eol_len, EVBUFFER_EOL_CRLF_STRICT);
            if (eol.pos < 0) {
                if (avail > 1024) return fail("chunk size line too long");
                return Status::More;
            }
            if (eol.pos > 1024) return fail("chunk size line too long");
            char line[1030];
            evbuffer_remove(in, line, static_cast<size_t>(eol.pos) + 2);
            std::string_view sv(line, static_cast<size_t>(eol.pos));
            size_t semi = sv.find(';');
            std::string_view digits = sv.substr(0, semi);
            if (semi != std::string_view::npos) digits = trim(digits);
            if (digits.empty() || digits.size() > 15) return fail("bad chunk size");
            uint64_t size = 0;
            for (char c : digits) {
                int d;
                if (c >= '0' && c <= '9') d = c - '0';
                else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
                else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
                else return fail("bad chunk size");
                size = size * 16 + uint64_t(d);
            }
            if (semi != std::string_view::npos && !valid_field_value(sv.substr(semi))) return fail("bad chunk extension");
            if (size == 0) {
                state_ = State::Trailers;
            } else {
                remaining_ = size;
                state_ = State::ChunkData;
            }
            break;
        }
        case State::ChunkData: {
            size_t n = static_cast<size_t>(std::min<uint64_t>(avail, remaining_));
            if (n == 0) return Status::More;
            emit_payload(in, out, n, tap);
            remaining_ -= n;
            if (remaining_ == 0) state_ = State::ChunkDataEnd;
            break;
        }
        case State::ChunkDataEnd: {
            if (avail < 2) return Status::More;
            char crlf[2];
            evbuffer_remove(in, crlf, 2);
            if (crlf[0] != '\r' || crlf[1] != '\n') return fail("chunk data not followed by CRLF");
            state_ = State::ChunkSize;
            break;
        }
        case State::Trailers: {
            // Trailer fields are checked for shape and dropped: nothing downstream relies on them.
            size_t eol_len = 0;
            evbuffer_ptr eol = evbuffer_search_eol(in, nullptr, &eol_len, EVBUFFER_EOL_CRLF_STRICT);
            if (eol.pos < 0) {
                if (avail + trailer_bytes_ > 16 * 1024) return fail("trailers too large");
                return Status::More;
            }
            size_t line_len = static_cast<size_t>(eol.pos);
            trailer_bytes_ += line_len + 2;
            if (trailer_bytes_ > 16 * 1024) return fail("trailers too large");
            evbuffer_drain(in, line_len + 2);
            if (line_len == 0) {
                emit_end(out);
                return Status::Done;
            }
            break;
        }
        }
    }
}

void write_response_head(std::string& out, int status, std::string_view reason,
                         const std::vector<Header>& headers) {
    if (reason.empty()) reason = status_reason(status);
    size_t bound = 9 + 4 + reason.size() + 2;
    for (const auto& h : headers) bound += HeadWriter::field_size(h.name, h.value.size());
    HeadWriter w(out, bound);
    w.put("HTTP/1.1 ");
    const char code[4] = {char('0' + status / 100 % 10), char('0' + status / 10 % 10), char('0' + status % 10), ' '};
    w.put({code, 4});
    w.put(reason);
    w.put("\r\n");
    for (const auto& h : headers) w.field(h.name, h.value);
}

const char* status_reason(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

}  // namespace stepflow::http1
