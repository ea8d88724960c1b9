// The protobuf wire format of the OTLP messages we send (proxy/otlp.proto), written by hand:
// spans are written as OTLP Span bytes on the loop thread as they end (proxy/span.cpp), and the
// exporter only wraps them (proxy/otlp_exporter.cpp). Why by hand: docs/architecture.md.
// Writers advance a cursor into a buffer sized beforehand from the *_size functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace stepflow::otlp_wire {

constexpr uint8_t kVarint = 0, kFixed64 = 1, kLen = 2, kFixed32 = 5;  // wire types

inline size_t varint_size(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        ++n;
    }
    return n;
}

inline void put_varint(char*& out, uint64_t v) {
    while (v >= 0x80) {
        *out++ = char(uint8_t(v) | 0x80);
        v >>= 7;
    }
    *out++ = char(v);
}

inline void put_tag(char*& out, uint32_t field, uint8_t type) { put_varint(out, (uint64_t(field) << 3) | type); }
inline size_t tag_size(uint32_t field) { return varint_size(uint64_t(field) << 3); }

inline void put_fixed64(char*& out, uint64_t v) {
    for (int i = 0; i < 8; ++i) *out++ = char(uint8_t(v >> (8 * i)));  // little-endian
}
inline void put_fixed32(char*& out, uint32_t v) {
    for (int i = 0; i < 4; ++i) *out++ = char(uint8_t(v >> (8 * i)));
}

// Most strings written are short (keys, ids, small values): copied with two overlapping
// fixed-size moves rather than a call to memcpy, which costs more than the copy itself.
inline void copy_bytes(char* out, const char* p, size_t n) {
    if (n >= 8 && n <= 16) {
        uint64_t a, b;
        std::memcpy(&a, p, 8);
        std::memcpy(&b, p + n - 8, 8);
        std::memcpy(out, &a, 8);
        std::memcpy(out + n - 8, &b, 8);
    } else if (n > 16 && n <= 32) {
        uint64_t a[2], b[2];
        std::memcpy(a, p, 16);
        std::memcpy(b, p + n - 16, 16);
        std::memcpy(out, a, 16);
        std::memcpy(out + n - 16, b, 16);
    } else if (n >= 4 && n < 8) {
        uint32_t a, b;
        std::memcpy(&a, p, 4);
        std::memcpy(&b, p + n - 4, 4);
        std::memcpy(out, &a, 4);
        std::memcpy(out + n - 4, &b, 4);
    } else if (n < 4) {
        for (size_t i = 0; i < n; ++i) out[i] = p[i];
    } else {
        std::memcpy(out, p, n);
    }
}

inline size_t bytes_field_size(uint32_t field, size_t len) { return tag_size(field) + varint_size(len) + len; }

inline void put_bytes(char*& out, uint32_t field, std::string_view b) {
    put_tag(out, field, kLen);
    put_varint(out, b.size());
    copy_bytes(out, b.data(), b.size());
    out += b.size();
}

// A KeyValue (key 1, value 2) whose AnyValue has `any` bytes, as field `field` of its parent;
// proto3 leaves an empty key out. Returns the bytes of the KeyValue's body.
inline size_t key_value_body_size(std::string_view key, size_t any) {
    return (key.empty() ? 0 : bytes_field_size(1, key.size())) + bytes_field_size(2, any);
}
inline void put_key_value_head(char*& out, uint32_t field, std::string_view key, size_t any) {
    put_tag(out, field, kLen);
    put_varint(out, key_value_body_size(key, any));
    if (!key.empty()) put_bytes(out, 1, key);
    put_tag(out, 2, kLen);
    put_varint(out, any);
}

// AnyValue is a oneof, so even a default value (0, false, "") is written.
inline size_t string_value_size(size_t len) { return bytes_field_size(1, len); }
inline size_t string_key_value_size(uint32_t field, std::string_view key, std::string_view value) {
    return bytes_field_size(field, key_value_body_size(key, string_value_size(value.size())));
}
inline void put_string_key_value(char*& out, uint32_t field, std::string_view key, std::string_view value) {
    put_key_value_head(out, field, key, string_value_size(value.size()));
    put_bytes(out, 1, value);
}

}  // namespace stepflow::otlp_wire
