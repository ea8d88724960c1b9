// The pieces of a log line, written straight into a std::string's storage. The line's size is
// foreseen once (LineWriter); then every piece is copied through a raw pointer that the caller
// keeps in a local (p = put_...(p, ...)), without a capacity check or a library call per piece.
// Only the unusual pieces, strings that need escapes and doubles the fast path does not take,
// make room for themselves (and may move the line). What is written is exactly what appending
// with std::string, the JSON escapes and "%.3f" (std::to_chars) would write.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

// SSE2 is part of x86-64; elsewhere the same checks run on 8-byte words (SWAR).
#if defined(__SSE2__) && defined(__x86_64__)
#define STEPFLOW_LOG_SSE2 1
#include <emmintrin.h>
#endif

namespace stepflow::log {

class LineWriter {
public:
    // Appends to `out`, with room for `expect` bytes (every piece that a fast path writes).
    LineWriter(std::string& out, size_t expect) : out_(out), start_(out.size()), expect_(expect) {
        out_.resize(start_ + expect);
    }
    char* begin() { return out_.data() + start_; }
    // Cuts `out` back to what was written up to p.
    void finish(const char* p) { out_.resize(size_t(p - out_.data())); }
    LineWriter(const LineWriter&) = delete;
    LineWriter& operator=(const LineWriter&) = delete;

    // The body of a JSON string (no quotes), escaped as RFC 8259 requires, with "\\ufffd" in place
    // of each ill-formed UTF-8 sequence (core/utf8.h): JSON text is UTF-8.
    char* escaped(char* p, std::string_view s);
    // As "%.3f" writes v.
    char* fixed3(char* p, double v);

private:
    char* escape_slow(char* p, std::string_view s);
    char* fixed3_slow(char* p, double v);
    char* make_room(char* p, size_t n);

    std::string& out_;
    size_t start_;
    size_t expect_;
};

namespace detail {

constexpr uint64_t kOnes = 0x0101010101010101ull;
constexpr uint64_t kHigh = 0x8080808080808080ull;

// Non-zero when one of the 8 bytes in x is below 0x20, '"', '\\' or 0x80 and up, which is
// well-formed UTF-8 or not (exact as a yes/no answer: a borrow only starts at a byte that matches).
inline uint64_t needs_escape(uint64_t x) {
    uint64_t control = (x - kOnes * 0x20) & ~x;
    uint64_t q = x ^ (kOnes * uint8_t('"'));
    uint64_t b = x ^ (kOnes * uint8_t('\\'));
    return (x | control | ((q - kOnes) & ~q) | ((b - kOnes) & ~b)) & kHigh;
}

#if defined(STEPFLOW_LOG_SSE2)
// One bit per byte of v that is below 0x20, '"', '\\' or 0x80 and up (its own top bit).
inline int escape_mask(__m128i v) {
    __m128i control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
    __m128i quote = _mm_cmpeq_epi8(v, _mm_set1_epi8('"'));
    __m128i backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'));
    return _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(v, control), _mm_or_si128(quote, backslash)));
}
inline __m128i load16(const char* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline void store16(char* p, __m128i v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
inline __m128i load_low8(const char* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
inline void store_low8(char* p, __m128i v) { _mm_storel_epi64(reinterpret_cast<__m128i*>(p), v); }
// Whether one of the 8 bytes of x needs an escape.
inline bool any_needs_escape(uint64_t x) { return (escape_mask(_mm_cvtsi64_si128(int64_t(x))) & 0xff) != 0; }
#else
inline bool any_needs_escape(uint64_t x) { return needs_escape(x) != 0; }
#endif

inline uint64_t load8(const char* p) {
    uint64_t x;
    std::memcpy(&x, p, 8);
    return x;
}
inline uint32_t load4(const char* p) {
    uint32_t x;
    std::memcpy(&x, p, 4);
    return x;
}

// "00" .. "99"
inline constexpr char kDigitPairs[] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

inline char* put_pair(char* p, unsigned v) {  // v < 100
    std::memcpy(p, kDigitPairs + 2 * v, 2);
    return p + 2;
}

}  // namespace detail

template <size_t N>
inline char* put(char* p, const char (&literal)[N]) {
    std::memcpy(p, literal, N - 1);
    return p + N - 1;
}
inline char* put(char* p, char c) {
    *p = c;
    return p + 1;
}
inline char* put(char* p, std::string_view s) {
    std::memcpy(p, s.data(), s.size());
    return p + s.size();
}
// strnlen(id, N): a trace or span id is full length or empty.
template <size_t N>
inline size_t id_length(const char (&id)[N]) {
#if defined(STEPFLOW_LOG_SSE2)
    static_assert(N == 17 || N == 33);
    const __m128i zero = _mm_setzero_si128();
    unsigned nul = unsigned(_mm_movemask_epi8(_mm_cmpeq_epi8(detail::load16(id), zero)));
    if constexpr (N == 33) nul |= unsigned(_mm_movemask_epi8(_mm_cmpeq_epi8(detail::load16(id + 16), zero))) << 16;
    if (nul) return size_t(__builtin_ctz(nul));
    return id[N - 1] == 0 ? N - 1 : N;
#else
    return strnlen(id, N);
#endif
}

// The id copied whole (N bytes, one or two moves), then as much of it as its length.
template <size_t N>
inline char* put_id(char* p, const char (&id)[N]) {
    std::memcpy(p, id, N);
    return p + id_length(id);
}

// 20 bytes at most; the small numbers most fields hold without std::to_chars' length loop.
inline char* put_integer(char* p, int64_t v) {
    if (v >= 0 && v < 1000) {
        auto u = static_cast<unsigned>(v);
        if (u < 10) return put(p, char('0' + u));
        if (u < 100) return detail::put_pair(p, u);
        *p = char('0' + u / 100);
        return detail::put_pair(p + 1, u % 100);
    }
    return std::to_chars(p, p + 20, v).ptr;
}

// Copies s 16 or 8 bytes at a time (the last piece overlapping), checking them for bytes that
// need an escape or may not be well-formed UTF-8; only a string that has one takes the slow path.
inline char* LineWriter::escaped(char* p, std::string_view s) {
    using namespace detail;
    const char* src = s.data();
    size_t n = s.size();
    bool bad;
#if defined(STEPFLOW_LOG_SSE2)
    if (n >= 16) {
        int mask = 0;
        for (size_t i = 0; i + 16 < n; i += 16) {
            __m128i v = load16(src + i);
            mask |= escape_mask(v);
            store16(p + i, v);
        }
        __m128i v = load16(src + n - 16);
        mask |= escape_mask(v);
        store16(p + n - 16, v);
        bad = mask != 0;
    } else if (n >= 8) {
        __m128i lo = load_low8(src), hi = load_low8(src + n - 8);
        store_low8(p, lo);
        store_low8(p + n - 8, hi);
        bad = escape_mask(_mm_unpacklo_epi64(lo, hi)) != 0;
    }
#else
    if (n >= 8) {
        uint64_t found = 0;
        for (size_t i = 0; i + 8 < n; i += 8) {
            uint64_t x = load8(src + i);
            found |= needs_escape(x);
            std::memcpy(p + i, &x, 8);
        }
        uint64_t x = load8(src + n - 8);
        found |= needs_escape(x);
        std::memcpy(p + n - 8, &x, 8);
        bad = found != 0;
    }
#endif
    else if (n >= 4) {
        uint32_t lo = load4(src), hi = load4(src + n - 4);
        std::memcpy(p, &lo, 4);
        std::memcpy(p + n - 4, &hi, 4);
        bad = any_needs_escape(lo | uint64_t(hi) << 32);
    } else {
        // 0..3 bytes, padded with spaces (which need no escape).
        uint64_t x = kOnes * ' ';
        for (size_t i = 0; i < n; ++i) {
            p[i] = src[i];
            x = (x << 8) | static_cast<unsigned char>(src[i]);
        }
        bad = any_needs_escape(x);
    }
    if (bad) [[unlikely]]
        return escape_slow(p, s);
    return p + n;
}

// "%.3f" of an ordinary v from its thousandths, rounded to nearest. a*1000 is rounded once, by
// at most half an ulp (a*1000 * 2^-53); unless it lies within twice that of a halfway point,
// the exact value rounds to the same integer. Those that do (ties, which round half to even,
// included), NaN, infinities and |v| >= 1e12 take std::to_chars.
inline char* LineWriter::fixed3(char* p, double v) {
    double a = std::fabs(v);
    if (!(a < 1e12)) [[unlikely]]
        return fixed3_slow(p, v);
    double r = a * 1000.0;
    auto whole = static_cast<int64_t>(r);          // r < 2^53: truncation is floor and exact
    double from_half = (r - double(whole)) - 0.5;  // exact near 0, where it matters
    if (std::fabs(from_half) <= r * 0x1p-52) [[unlikely]]
        return fixed3_slow(p, v);
    auto thousandths = static_cast<uint64_t>(whole) + (from_half > 0 ? 1 : 0);
    if (std::signbit(v)) *p++ = '-';
    p = put_integer(p, static_cast<int64_t>(thousandths / 1000));  // '-', 13 digits, '.', 3 decimals: 18
    auto m = static_cast<unsigned>(thousandths % 1000);
    p[0] = '.';
    p[1] = char('0' + m / 100);
    return detail::put_pair(p + 2, m % 100);
}

}  // namespace stepflow::log
