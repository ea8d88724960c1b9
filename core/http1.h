// HTTP/1.1 message heads and body framing (RFC 9112), written for a proxy: heads are parsed from
// one contiguous copy (they are small); bodies are never copied, only moved chain by chain
// between libevent buffers while their framing is checked and re-emitted.
#pragma once

#include <cassert>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

struct evbuffer;

namespace stepflow::http1 {

// The fields a proxy acts on, recognised once when a head is split so that later checks compare
// a byte instead of a case-insensitive string.
enum class Field : uint8_t {
    Other,
    ContentLength,
    TransferEncoding,
    Connection,
    Host,
    Expect,
    KeepAlive,
    ProxyConnection,
    TE,
    Trailer,
    Upgrade,
    XForwardedFor,
    XForwardedProto,
    ContentType,
};

Field classify(std::string_view name);

struct Header {
    std::string_view name;
    std::string_view value;
    Field field = Field::Other;
};

enum class Framing { None, Length, Chunked, UntilClose };

struct Limits {
    size_t max_head_size = 64 * 1024;
    int max_headers = 100;
};

// Why a request cannot be served; `status` is what the client is told (400, 431, 501, 505).
struct Error {
    int status = 0;
    const char* reason = "";
    explicit operator bool() const { return status != 0; }
};

struct Head {
    std::string raw;  // owns the bytes every string_view below points into
    std::vector<Header> headers;
    int version_minor = 1;
    Framing framing = Framing::None;
    uint64_t content_length = 0;
    bool keep_alive = true;

    // Request fields
    std::string_view method;
    std::string_view target;
    std::string_view host;
    bool expect_continue = false;
    bool is_head_method = false;

    // Response fields
    int status = 0;
    std::string_view reason;

    // First value of a header (case-insensitive name), empty view when absent.
    std::string_view get(std::string_view name) const;
    bool has(std::string_view name) const;
    // Back to an empty head, keeping the buffers for the next one on the connection.
    void clear();
};

// ASCII case-insensitive equality. The length check is inline: most comparisons (a header
// looked up among a head's fields) end there, without a call.
bool iequals_bytes(const char* a, const char* b, size_t n);
inline bool iequals(std::string_view a, std::string_view b) {
    return a.size() == b.size() && iequals_bytes(a.data(), b.data(), a.size());
}

// Looks for a complete head at the front of `in`. Returns its length including the blank line,
// 0 while incomplete, or SIZE_MAX when `limit` bytes arrived without one. `scan_from` remembers
// how far earlier calls looked, so a slowly arriving head is not rescanned from the start.
size_t find_head_end(evbuffer* in, size_t limit, size_t& scan_from);

// Parse a complete head (as moved out of the buffer into `head.raw`).
Error parse_request(Head& head, const Limits& limits);
Error parse_response(Head& head, bool request_was_head);

// parse_request's checks for a request head built from fields rather than split from text (an
// HTTP/2 request): head.method, head.target and head.headers are set, each field classified
// (classify()) and its views valid as long as the head. The names and values must be checked
// already: nghttp2 does (RFC 9113 §8.2.1: lower-case tokens; values without NUL, CR, LF, other
// controls, DEL or surrounding whitespace — what split_lines accepts, trimmed). Checks their
// number, the method, target, framing and Host as for HTTP/1.1, and sets the derived members
// as parse_request does.
Error check_request(Head& head, const Limits& limits);

// Which headers never travel past this hop: the fixed set of RFC 9110 §7.6.1 plus any named in
// the message's own Connection header.
class HopByHop {
public:
    explicit HopByHop(const Head& head);
    bool contains(const Header& h) const;

private:
    std::vector<std::string_view> listed_;  // usually empty
};

// Streams a body from `in` to `out`, checking the incoming framing and emitting the outgoing
// one (chunked or raw). Payload bytes are moved, not copied.
// Sees the payload a pump moves, before any chunk framing (a request's replay copy).
class BodyTap {
public:
    virtual void payload(evbuffer* from, size_t n) = 0;  // the first `n` bytes of `from`

protected:
    ~BodyTap() = default;
};

class BodyPump {
public:
    enum class Status { More, Done, Error };

    void start(Framing in_framing, uint64_t content_length, bool chunked_out);
    // Moves what is available; Done once the body's end was seen (the end framing is written).
    // `tap`, when given, sees each piece of payload first.
    Status pump(evbuffer* in, evbuffer* out, BodyTap* tap = nullptr);
    // For UntilClose bodies: the peer closed, which ends the body. Writes the end framing.
    void finish_on_close(evbuffer* out);
    bool done() const { return state_ == State::Done; }
    bool until_close() const { return framing_ == Framing::UntilClose; }
    uint64_t payload_bytes() const { return payload_bytes_; }
    const char* error() const { return error_; }

private:
    enum class State { Data, ChunkSize, ChunkData, ChunkDataEnd, Trailers, Done, Failed };
    Status fail(const char* why);
    void emit_payload(evbuffer* in, evbuffer* out, size_t n, BodyTap* tap);
    void emit_end(evbuffer* out);

    Framing framing_ = Framing::None;
    bool chunked_out_ = false;
    State state_ = State::Done;
    uint64_t remaining_ = 0;
    uint64_t payload_bytes_ = 0;
    size_t trailer_bytes_ = 0;
    const char* error_ = "";
};

// Writes a head at the end of a string sized once for at most `bound` more bytes, then cut to
// what was written: a std::string append costs about 30 instructions, four per field.
class HeadWriter {
public:
    HeadWriter(std::string& out, size_t bound) : out_(out) {
        size_t at = out.size();
        out.resize(at + bound);
        p_ = out.data() + at;
    }
    ~HeadWriter() { out_.resize(size_t(p_ - out_.data())); }
    HeadWriter(const HeadWriter&) = delete;
    HeadWriter& operator=(const HeadWriter&) = delete;

    static constexpr size_t field_size(std::string_view name, size_t value_size) { return name.size() + value_size + 4; }
    void put(std::string_view s) {
        assert(s.size() <= size_t(out_.data() + out_.size() - p_));  // within the bound
        std::memcpy(p_, s.data(), s.size());
        p_ += s.size();
    }
    void field(std::string_view name, std::string_view value) {
        put(name);
        put(": ");
        put(value);
        put("\r\n");
    }

private:
    std::string& out_;
    char* p_;
};

// The start line and fields of a response to an HTTP/1.1 client (no blank line: the caller adds
// its framing fields first). `status` is three digits; an empty reason becomes status_reason().
// Every byte comes from a parsed head or from the balancer, so nothing is checked again here.
void write_response_head(std::string& out, int status, std::string_view reason, const std::vector<Header>& headers);

const char* status_reason(int status);

}  // namespace stepflow::http1
