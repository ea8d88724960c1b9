#include <catch2/catch.hpp>

#include <cctype>
#include <string>

#include <event2/buffer.h>

#include "core/http1.h"
#include "core/text.h"

using namespace stepflow::http1;

namespace {

Error parse(const std::string& text, Head& head, Limits limits = {}) {
    head = Head{};
    head.raw = text;
    return parse_request(head, limits);
}

struct Buf {
    evbuffer* b = evbuffer_new();
    ~Buf() { evbuffer_free(b); }
    void add(const std::string& s) { evbuffer_add(b, s.data(), s.size()); }
    std::string str() const {
        std::string s(evbuffer_get_length(b), '\0');
        evbuffer_copyout(b, s.data(), s.size());
        return s;
    }
};

}  // namespace

TEST_CASE("a well-formed request head parses", "[http1]") {
    Head h;
    REQUIRE_FALSE(parse("POST /rpc?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-A:  v  \r\n\r\n", h));
    CHECK(h.method == "POST");
    CHECK(h.target == "/rpc?x=1");
    CHECK(h.version_minor == 1);
    CHECK(h.framing == Framing::Length);
    CHECK(h.content_length == 12);
    CHECK(h.get("x-a") == "v");
    CHECK(h.keep_alive);
}

TEST_CASE("malformed request heads are rejected with the right status", "[http1]") {
    Head h;
    struct Case {
        const char* text;
        int status;
    } cases[] = {
        {"GET / HTTP/1.1\r\n\r\n", 400},                                               // no Host
        {"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},                         // two Hosts
        {"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501},
        {"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 501},
        {"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400},                                   // double space
        {"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505},
        {"GET / FOO/1.1\r\nHost: a\r\n\r\n", 400},
        {"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400},                                   // space before colon
        {"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400},
        {"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
    };
    for (const auto& c : cases) {
        INFO(c.text);
        Error e = parse(c.text, h);
        CHECK(e.status == c.status);
    }
}

TEST_CASE("identical repeated Content-Length is accepted", "[http1]") {
    Head h;
    REQUIRE_FALSE(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", h));
    CHECK(h.content_length == 3);
}

TEST_CASE("too many header fields give 431", "[http1]") {
    std::string text = "GET / HTTP/1.1\r\nHost: a\r\n";
    for (int i = 0; i < 20; ++i) text += "X-" + std::to_string(i) + ": v\r\n";
    text += "\r\n";
    Head h;
    CHECK(parse(text, h, {64 * 1024, 10}).status == 431);
}

TEST_CASE("HTTP/1.0 and Connection decide keep-alive", "[http1]") {
    Head h;
    REQUIRE_FALSE(parse("GET / HTTP/1.0\r\n\r\n", h));
    CHECK_FALSE(h.keep_alive);
    REQUIRE_FALSE(parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", h));
    CHECK(h.keep_alive);
    REQUIRE_FALSE(parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", h));
    CHECK_FALSE(h.keep_alive);
}

TEST_CASE("hop-by-hop set includes fields named by Connection", "[http1]") {
    Head h;
    REQUIRE_FALSE(parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-secret, close\r\nX-Secret: 1\r\n\r\n", h));
    HopByHop hop(h);
    auto field = [](std::string_view name) { return Header{name, "", classify(name)}; };
    CHECK(hop.contains(field("X-Secret")));
    CHECK(hop.contains(field("keep-alive")));
    CHECK(hop.contains(field("Transfer-Encoding")));
    CHECK(hop.contains(field("TE")));
    CHECK_FALSE(hop.contains(field("traceparent")));
    CHECK_FALSE(hop.contains(field("Content-Length")));
}

TEST_CASE("field names are classified case-insensitively", "[http1]") {
    CHECK(classify("Content-Length") == Field::ContentLength);
    CHECK(classify("TRANSFER-ENCODING") == Field::TransferEncoding);
    CHECK(classify("x-forwarded-proto") == Field::XForwardedProto);
    CHECK(classify("Host") == Field::Host);
    CHECK(classify("Hosts") == Field::Other);
    CHECK(classify("content-lengtH") == Field::ContentLength);
    CHECK(classify("content_length") == Field::Other);
}

TEST_CASE("find_head_end finds the blank line and enforces the limit", "[http1]") {
    Buf in;
    size_t scan = 0;
    in.add("GET / HTTP/1.1\r\nHost: a\r\n");
    CHECK(find_head_end(in.b, 1024, scan) == 0);
    in.add("\r\nBODY");
    CHECK(find_head_end(in.b, 1024, scan) == 27);
    Buf big;
    size_t scan2 = 0;
    big.add(std::string(2000, 'a'));
    CHECK(find_head_end(big.b, 1024, scan2) == SIZE_MAX);
}

TEST_CASE("find_head_end finds a blank line split across buffer chains", "[http1]") {
    // Each piece in its own chain (as when a head arrives in several reads), the CRLFCRLF split.
    const std::string pieces[] = {"POST / HTTP/1.1\r\nHost: a\r", "\n\r", "\nxy"};
    Buf in;
    size_t scan = 0;
    for (const auto& piece : pieces) {
        evbuffer* part = evbuffer_new();
        evbuffer_add(part, piece.data(), piece.size());
        evbuffer_add_buffer(in.b, part);  // moves the chain, never merges it into the last
        evbuffer_free(part);
    }
    REQUIRE(evbuffer_peek(in.b, -1, nullptr, nullptr, 0) == 3);
    CHECK(find_head_end(in.b, 1024, scan) == 28);
    size_t scan2 = 0;
    CHECK(find_head_end(in.b, 27, scan2) == SIZE_MAX);  // complete, but over the limit
    Buf one;
    size_t scan3 = 0;
    one.add("GET / HTTP/1.1\r\n\r\n");
    CHECK(find_head_end(one.b, 18, scan3) == 18);
    CHECK(find_head_end(one.b, 17, scan3 = 0) == SIZE_MAX);
}

TEST_CASE("chunked bodies decode across arbitrary splits and re-encode", "[http1]") {
    const std::string wire = "5\r\nhello\r\n1;ext=1\r\n \r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";
    for (size_t step : {size_t(1), size_t(2), size_t(7), wire.size()}) {
        INFO("step " << step);
        Buf in, raw, rechunked;
        BodyPump to_raw, to_chunked;
        to_raw.start(Framing::Chunked, 0, false);
        BodyPump::Status st = BodyPump::Status::More;
        for (size_t i = 0; i < wire.size(); i += step) {
            in.add(wire.substr(i, step));
            st = to_raw.pump(in.b, raw.b);
            REQUIRE(st != BodyPump::Status::Error);
        }
        CHECK(st == BodyPump::Status::Done);
        CHECK(raw.str() == "hello 0123456789abcdef");
        CHECK(to_raw.payload_bytes() == 22);

        Buf in2;
        in2.add(wire);
        to_chunked.start(Framing::Chunked, 0, true);
        CHECK(to_chunked.pump(in2.b, rechunked.b) == BodyPump::Status::Done);
        CHECK(rechunked.str() == "5\r\nhello\r\n1\r\n \r\n10\r\n0123456789abcdef\r\n0\r\n\r\n");
    }
}

TEST_CASE("bad chunk framing is an error", "[http1]") {
    for (std::string wire : {"zz\r\nab\r\n", "3\r\nabcX\r\n", "-1\r\n", "1234567890123456\r\n", "\r\n"}) {
        INFO(wire);
        Buf in, out;
        BodyPump p;
        p.start(Framing::Chunked, 0, false);
        in.add(wire);
        CHECK(p.pump(in.b, out.b) == BodyPump::Status::Error);
    }
}

TEST_CASE("content-length bodies stop at the length and leave the next request", "[http1]") {
    Buf in, out;
    BodyPump p;
    p.start(Framing::Length, 5, false);
    in.add("hel");
    CHECK(p.pump(in.b, out.b) == BodyPump::Status::More);
    in.add("loGET /");
    CHECK(p.pump(in.b, out.b) == BodyPump::Status::Done);
    CHECK(out.str() == "hello");
    CHECK(evbuffer_get_length(in.b) == 5);
}

TEST_CASE("response heads decide their framing", "[http1]") {
    Head h;
    h.raw = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    REQUIRE_FALSE(parse_response(h, false));
    CHECK(h.framing == Framing::Chunked);
    h = Head{};
    h.raw = "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n";
    REQUIRE_FALSE(parse_response(h, false));
    CHECK(h.framing == Framing::None);
    h = Head{};
    h.raw = "HTTP/1.0 200 OK\r\n\r\n";
    REQUIRE_FALSE(parse_response(h, false));
    CHECK(h.framing == Framing::UntilClose);
    CHECK_FALSE(h.keep_alive);
    h = Head{};
    h.raw = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
    REQUIRE_FALSE(parse_response(h, true));
    CHECK(h.framing == Framing::None);
    h = Head{};
    h.raw = "HTTP/1.1 2x0 OK\r\n\r\n";
    CHECK(parse_response(h, false).status == 502);
}

TEST_CASE("a reason phrase takes HTAB, SP, VCHAR and obs-text only", "[http1]") {
    for (std::string bad : {std::string("OK\nSet-Cookie: x=1"), std::string("OK\rX"), std::string("O\0K", 3),
                            std::string("O\x7fK"), std::string("O\x01K")}) {
        Head h;
        h.raw = "HTTP/1.1 200 " + bad + "\r\nContent-Length: 0\r\n\r\n";
        Error e = parse_response(h, false);
        CHECK(e.status == 502);
        CHECK(std::string_view(e.reason) == "bad upstream reason phrase");
    }
    Head h;
    h.raw = "HTTP/1.1 200 Tr\xe8s\tbien !\r\n\r\n";
    REQUIRE_FALSE(parse_response(h, false));
    CHECK(h.reason == "Tr\xe8s\tbien !");
}

TEST_CASE("write_response_head writes a head that parses back to the same fields", "[http1]") {
    std::vector<Header> fields = {{"X-A", "caf\xe9 au\tlait"}, {"Content-Length", "2"}};
    Head h;
    write_response_head(h.raw, 404, "", fields);
    h.raw += "\r\n";
    REQUIRE_FALSE(parse_response(h, false));
    CHECK(h.status == 404);
    CHECK(h.reason == "Not Found");
    REQUIRE(h.headers.size() == 2);
    CHECK(h.headers[0].value == "caf\xe9 au\tlait");
}

TEST_CASE("iequals compares ASCII case-insensitively, word by word and byte by byte", "[http1]") {
    auto reference = [](std::string_view a, std::string_view b) {
        if (a.size() != b.size()) return false;
        auto lower = [](unsigned char c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; };
        for (size_t i = 0; i < a.size(); ++i)
            if (lower(static_cast<unsigned char>(a[i])) != lower(static_cast<unsigned char>(b[i]))) return false;
        return true;
    };
    // Every pair of bytes, at every position of strings of 1..19 bytes (both sides of the
    // word boundary and the overlapping last word).
    for (size_t n = 1; n < 20; ++n) {
        for (size_t at : {size_t(0), n / 2, n - 1}) {
            for (int x = 0; x < 256; ++x) {
                for (int y = 0; y < 256; y += (n > 3 ? 7 : 1)) {
                    std::string a(n, 'k'), b(n, 'K');
                    a[at] = char(x);
                    b[at] = char(y);
                    if (iequals(a, b) != reference(a, b)) FAIL("n=" << n << " at=" << at << " x=" << x << " y=" << y);
                }
            }
        }
    }
    CHECK(iequals("Content-Length", "content-length"));
    CHECK_FALSE(iequals("Content-Length", "content-lengtH "));
    CHECK_FALSE(iequals("content-lengt\xc8", "content-lengt\xe8"));  // not ASCII letters
    CHECK_FALSE(iequals("[", "{"));
    CHECK(iequals("", ""));
}

TEST_CASE("field values are scanned whole words at a time, stopping at CTLs and DEL", "[http1]") {
    // A value with one forbidden byte at each position, in values of 1..24 bytes: the head must
    // be refused, whatever word the byte falls in; HTAB and obs-text are accepted.
    // The status of a head whose X-V value is n 'v's with `byte` at `at`.
    auto status_with = [](size_t n, size_t at, int byte) {
        std::string value(n, 'v');
        value[at] = char(byte);
        Head head;
        return parse("GET / HTTP/1.1\r\nHost: h\r\nX-V: " + value + "\r\n\r\n", head).status;
    };
    for (size_t n = 1; n <= 24; ++n) {
        for (size_t at = 0; at < n; ++at) {
            for (int bad : {0x00, 0x01, 0x0b, 0x1f, 0x7f})
                if (int s = status_with(n, at, bad); s != 400) FAIL("n=" << n << " at=" << at << " byte=" << bad << " status=" << s);
            for (int fine : {0x09, 0x20, 0x7e, 0x80, 0xff})
                if (int s = status_with(n, at, fine); s != 0) FAIL("n=" << n << " at=" << at << " byte=" << fine << " status=" << s);
        }
    }
}

TEST_CASE("field names and values are split exactly wherever a byte falls in a 16-byte block", "[http1]") {
    // The scanner passes common name bytes and plain value bytes sixteen at a time: a name or
    // value of 1..40 bytes with one byte of every value at each position must come out as the
    // byte-at-a-time rules say (a tchar keeps the name whole, anything else refuses the head;
    // HTAB, SP, VCHAR and obs-text stay in the value), with the same name and value, wherever
    // the field sits in the head.
    auto is_tchar = [](int c) {
        return std::isalnum(c) || std::string_view("!#$%&'*+-.^_`|~").find(char(c)) != std::string_view::npos;
    };
    for (bool first : {true, false}) {
        auto head_with = [&](const std::string& field) {
            return first ? "GET / HTTP/1.1\r\n" + field + "\r\nHost: h\r\nAccept: */*\r\n\r\n"
                         : "GET / HTTP/1.1\r\nHost: h\r\n" + field + "\r\n\r\n";
        };
        for (size_t n = 1; n <= 40; ++n) {
            for (size_t at = 0; at < n; ++at) {
                for (int byte = 1; byte < 256; ++byte) {
                    if (byte == ':') continue;  // ends the name: another field
                    std::string name(n, 'n');
                    name[at] = char(byte);
                    Head head;
                    int status = parse(head_with(name + ": v"), head).status;
                    bool want_ok = is_tchar(byte);
                    if ((status == 0) != want_ok) FAIL("name n=" << n << " at=" << at << " byte=" << byte << " status=" << status);
                    if (want_ok && head.get(name) != "v") FAIL("name n=" << n << " at=" << at << " byte=" << byte << " value lost");
                }
                for (int byte = 0; byte < 256; ++byte) {
                    if (byte == '\r' || byte == '\n') continue;
                    std::string value(n, 'v');
                    value[at] = char(byte);
                    Head head;
                    int status = parse(head_with("X-V: " + value), head).status;
                    bool want_ok = byte >= 0x20 ? byte != 0x7f : byte == '\t';
                    if ((status == 0) != want_ok) FAIL("value n=" << n << " at=" << at << " byte=" << byte << " status=" << status);
                    // Leading and trailing SP/HTAB are not part of the value.
                    bool edge_ws = (byte == ' ' || byte == '\t') && (at == 0 || at == n - 1);
                    std::string want = edge_ws ? std::string(stepflow::trim(value)) : value;
                    if (want_ok && head.get("x-v") != want) FAIL("value n=" << n << " at=" << at << " byte=" << byte << " wrong value");
                }
            }
        }
    }
}
