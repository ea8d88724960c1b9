#include <catch2/catch.hpp>

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <random>
#include <string>

#include <event2/event.h>

#include "core/log.h"

using namespace stepflow;

TEST_CASE("records written during one loop turn reach the writer as one batch", "[log]") {
    event_base* base = event_base_new();
    log::attach_loop(base);
    uint64_t before = log::batches_handed();
    for (int i = 0; i < 20; ++i) log::write(log::Level::Debug, "batched record", {{"n", i}});
    CHECK(log::batches_handed() == before);  // still in this thread's buffer: no lock, no wake yet
    event_base_loop(base, EVLOOP_NONBLOCK);   // the turn ends: the buffer is handed over once
    CHECK(log::batches_handed() == before + 1);
    log::write(log::Level::Debug, "after the turn");
    log::detach_loop();  // hands over what is left
    CHECK(log::batches_handed() == before + 2);
    event_base_free(base);
    log::flush(std::chrono::seconds(2));
}

TEST_CASE("a record written inside a correlation scope carries trace_id and span_id", "[log]") {
    log::Correlation ids;
    std::snprintf(ids.trace_id, sizeof ids.trace_id, "%s", "4bf92f3577b34da6a3ce929d0e0e4736");
    std::snprintf(ids.span_id, sizeof ids.span_id, "%s", "00f067aa0ba902b7");
    std::string line;
    {
        log::Scope scope(&ids);
        log::format_line(line, log::Level::Info, "request", {{"status", 200}});
    }
    CHECK(line.find("\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\":\"00f067aa0ba902b7\"") != std::string::npos);
    line.clear();
    log::format_line(line, log::Level::Info, "request", {{"status", 200}});
    CHECK(line.find("trace_id") == std::string::npos);  // the scope ended
}

TEST_CASE("a record written inside an At scope carries the wall time of that steady reading", "[log]") {
    // The access log stamps its line with the reading that ended the request's duration. A
    // reading an hour old must come out an hour before now (to the microsecond, give or take
    // the time between the clock reads here), and the scope's end restores the clock's own time.
    using namespace std::chrono;
    auto line_time = [](const std::string& line) {  // "time":"YYYY-MM-DDTHH:MM:SS.uuuuuuZ"
        size_t at = line.find("\"time\":\"");
        REQUIRE(at != std::string::npos);
        std::tm tm{};
        int us = 0;
        REQUIRE(std::sscanf(line.c_str() + at + 8, "%4d-%2d-%2dT%2d:%2d:%2d.%6dZ", &tm.tm_year, &tm.tm_mon,
                            &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &us) == 7);
        tm.tm_year -= 1900;
        tm.tm_mon -= 1;
        return int64_t(timegm(&tm)) * 1000000 + us;
    };
    auto wall_us = [] { return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count(); };
    for (auto ago : {hours(1), hours(0), hours(-1)}) {
        std::string line;
        int64_t before = wall_us();
        {
            log::At at(steady_clock::now() - ago);
            log::format_line(line, log::Level::Info, "request", {});
        }
        int64_t after = wall_us();
        int64_t stamped = line_time(line) + duration_cast<microseconds>(ago).count();
        CHECK(stamped >= before - 1000);  // the offset is read from two clocks, microseconds apart
        CHECK(stamped <= after + 1000);
    }
    std::string line;
    int64_t before = wall_us();
    log::format_line(line, log::Level::Info, "request", {});
    CHECK(line_time(line) >= before);
}

TEST_CASE("field values are written as printf and the JSON escapes would write them", "[log]") {
    log::configure(log::Level::Info, log::Format::Json);
    // Doubles as "%.3f" (halfway cases included: the exact binary value decides), integers in
    // full, strings escaped; the time as YYYY-MM-DDTHH:MM:SS.uuuuuuZ.
    const double doubles[] = {0.0, 0.0005, 1.0005, 2.5, 12.3456, -3.25, 1e-7, 123456789.987654, 1e20};
    for (double d : doubles) {
        char want[64];
        std::snprintf(want, sizeof want, "\"d\":%.3f}", d);
        std::string line;
        log::format_line(line, log::Level::Info, "m", {{"d", d}});
        CHECK(line.find(want) != std::string::npos);
    }
    std::string line;
    log::format_line(line, log::Level::Info, "m",
                     {{"i", int64_t(-9223372036854775807LL - 1)}, {"u", uint64_t(42)},
                      {"s", std::string_view("a\"b\\c\nd\x01" "e\xc3\xa9")}, {"b", false}});
    CHECK(line.find("\"i\":-9223372036854775808,\"u\":42,\"s\":\"a\\\"b\\\\c\\nd\\u0001e\xc3\xa9\",\"b\":false}") !=
          std::string::npos);
    int y, mo, d, h, mi, s, us;
    char z;
    REQUIRE(std::sscanf(line.c_str(), "{\"time\":\"%4d-%2d-%2dT%2d:%2d:%2d.%6d%c\"", &y, &mo, &d, &h, &mi, &s, &us, &z) == 8);
    CHECK(line[36] == '"');  // {"time":" and 27 characters
    CHECK(z == 'Z');
    CHECK((y >= 2024 && mo >= 1 && mo <= 12 && d >= 1 && d <= 31 && h < 24 && mi < 60 && s < 61 && us < 1000000));
}

namespace {

// The line after its time ({"time":"YYYY-MM-DDTHH:MM:SS.uuuuuuZ" in JSON, the time in text).
std::string after_time(const std::string& line, log::Format format) {
    size_t skip = format == log::Format::Json ? 37 : 27;
    REQUIRE(line.size() > skip);
    return line.substr(skip);
}

std::string json_line(std::string_view message, std::initializer_list<log::Field> fields) {
    std::string line;
    log::format_line(line, log::Level::Info, message, fields);
    return after_time(line, log::Format::Json);
}

// JSON escaping done the obvious way, a byte at a time: what the formatter must match.
std::string escaped_bytewise(std::string_view s) {
    std::string out;
    for (unsigned char c : s) {
        char buf[8];
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
            if (c < 0x20) {
                std::snprintf(buf, sizeof buf, "\\u%04x", c);
                out += buf;
            } else {
                out += char(c);
            }
        }
    }
    return out;
}

std::string fixed3_reference(double d) {
    char buf[400];
    auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::fixed, 3);
    return std::string(buf, r.ptr);
}

std::string fixed3_formatted(double d) {
    std::string line = json_line("m", {{"d", d}});
    REQUIRE(line.size() > 30);
    return line.substr(line.find("\"d\":") + 4, line.size() - line.find("\"d\":") - 4 - 2);  // up to }\n
}

}  // namespace

TEST_CASE("a JSON line is written byte for byte: escapes, UTF-8, empty strings, every kind of field", "[log]") {
    log::configure(log::Level::Info, log::Format::Json);
    CHECK(json_line("request", {{"method", "POST"}, {"path", "/"}, {"status", 200}, {"instance", ""},
                                {"duration_ms", 0.0625}, {"queue_wait_ms", 0.1875}, {"retries", 0},
                                {"ok", true}, {"bad", false}, {"bytes_in", int64_t(-1)}}) ==
          ",\"level\":\"info\",\"message\":\"request\",\"method\":\"POST\",\"path\":\"/\",\"status\":200,"
          "\"instance\":\"\",\"duration_ms\":0.062,\"queue_wait_ms\":0.188,\"retries\":0,\"ok\":true,"
          "\"bad\":false,\"bytes_in\":-1}\n");
    // Escapes in the message, in keys and in values; UTF-8 as it is, stray bytes as U+FFFD.
    CHECK(json_line("say \"hi\"\n", {{"k\"ey", "a\\b"}, {"tab\t", "\x01\x1f\x7f"}, {"utf8", "h\xc3\xa9llo \xe2\x9c\x93"},
                                     {"stray", "\xff\x80"}}) ==
          ",\"level\":\"info\",\"message\":\"say \\\"hi\\\"\\n\",\"k\\\"ey\":\"a\\\\b\",\"tab\\t\":\"\\u0001\\u001f\x7f\","
          "\"utf8\":\"h\xc3\xa9llo \xe2\x9c\x93\",\"stray\":\"\\ufffd\\ufffd\"}\n");
    CHECK(json_line("", {{"", std::string_view("\0x", 2)}}) ==
          ",\"level\":\"info\",\"message\":\"\",\"\":\"\\u0000x\"}\n");
    // Integers: the small ones have their own path, the rest go through std::to_chars.
    CHECK(json_line("n", {{"a", 0}, {"b", 9}, {"c", 10}, {"d", 99}, {"e", 100}, {"f", 999}, {"g", 1000},
                          {"h", int64_t(-9223372036854775807LL - 1)}, {"i", int64_t(9223372036854775807LL)},
                          {"j", uint64_t(18446744073709551615ULL)}}) ==
          ",\"level\":\"info\",\"message\":\"n\",\"a\":0,\"b\":9,\"c\":10,\"d\":99,\"e\":100,\"f\":999,\"g\":1000,"
          "\"h\":-9223372036854775808,\"i\":9223372036854775807,\"j\":-1}\n");
}

TEST_CASE("strings of every length are escaped as a byte-at-a-time escaper would, wherever the escape falls", "[log]") {
    log::configure(log::Level::Info, log::Format::Json);
    // Lengths around the 4-, 8- and 16-byte pieces the formatter checks at once, with one byte
    // that needs an escape at every position (and none).
    const char specials[] = {'"', '\\', '\n', '\x00', '\x1f', '\r', '\t'};
    for (size_t len = 0; len <= 40; ++len) {
        for (size_t at = 0; at <= len; ++at) {
            std::string s(len, 'a');
            for (size_t i = 0; i < len; ++i) s[i] = char('a' + i % 26);
            if (at < len) s[at] = specials[(len + at) % sizeof specials];
            std::string want = ",\"level\":\"info\",\"message\":\"" + escaped_bytewise(s) + "\",\"" +
                               escaped_bytewise(s) + "\":\"" + escaped_bytewise(s) + "\"}\n";
            INFO("length " << len << ", escape at " << at);
            CHECK(json_line(s, {{s, s}}) == want);
        }
    }
    // A line far longer than foreseen: every byte of a long value grows to six.
    std::string controls(3000, '\x01');
    std::string want;
    for (int i = 0; i < 3000; ++i) want += "\\u0001";
    CHECK(json_line("m", {{"v", controls}, {"after", 1.5}}) ==
          ",\"level\":\"info\",\"message\":\"m\",\"v\":\"" + want + "\",\"after\":1.500}\n");
    // Lines are appended: what the string held is kept.
    std::string line = "previous line\n";
    log::format_line(line, log::Level::Warn, "m", {{"v", "x\"y"}});
    CHECK(line.rfind("previous line\n{\"time\":\"", 0) == 0);
    CHECK(line.substr(14 + 37) == ",\"level\":\"warn\",\"message\":\"m\",\"v\":\"x\\\"y\"}\n");
    std::string body = "[";
    log::append_json_escaped(body, "a\"b\x02");
    CHECK(body == "[a\\\"b\\u0002");
}

TEST_CASE("a JSON string is UTF-8: ill-formed sequences become \\ufffd, one per maximal subpart", "[log]") {
    log::configure(log::Level::Info, log::Format::Json);
    auto body = [](std::string_view s) {
        std::string out;
        log::append_json_escaped(out, s);
        return out;
    };
    // As Unicode's recommended practice (and Python's bytes.decode("utf-8", "replace")) has them.
    CHECK(body("\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf") == "\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf");
    CHECK(body("\xff\x80") == "\\ufffd\\ufffd");                       // no lead byte
    CHECK(body("\xc0\xaf") == "\\ufffd\\ufffd");                       // overlong '/'
    CHECK(body("\xe0\x80\xaf") == "\\ufffd\\ufffd\\ufffd");             // overlong, three bytes
    CHECK(body("\xed\xa0\x80") == "\\ufffd\\ufffd\\ufffd");             // a surrogate
    CHECK(body("\xf4\x90\x80\x80") == "\\ufffd\\ufffd\\ufffd\\ufffd");   // above U+10FFFF
    CHECK(body("\xf5\x80") == "\\ufffd\\ufffd");
    CHECK(body("\xe2\x9c") == "\\ufffd");                                // cut short at the end
    CHECK(body("\xe2\x9c" "A") == "\\ufffdA");                              // cut short by ASCII
    CHECK(body("\xf0\x9f\x98x\"") == "\\ufffdx\\\"");
    CHECK(body("caf\xe9") == "caf\\ufffd");                               // Latin-1
    // At every position of strings around the 4-, 8- and 16-byte pieces checked at once: a
    // well-formed character stays, a cut one is replaced.
    for (size_t len = 0; len <= 40; ++len) {
        for (size_t at = 0; at <= len; ++at) {
            std::string head(at, 'a'), tail(len - at, 'z');
            INFO("length " << len << ", sequence at " << at);
            CHECK(body(head + "\xe2\x9c\x93" + tail) == head + "\xe2\x9c\x93" + tail);
            CHECK(body(head + "\xe2\x9c" + tail) == head + "\\ufffd" + tail);
            CHECK(body(head + "\xbf" + tail) == head + "\\ufffd" + tail);
        }
    }
}

TEST_CASE("doubles are written as %.3f: halfway cases by the exact binary value, huge, NaN and infinite ones", "[log]") {
    log::configure(log::Level::Info, log::Format::Json);
    CHECK(fixed3_formatted(0.0) == "0.000");
    CHECK(fixed3_formatted(-0.0) == "-0.000");
    CHECK(fixed3_formatted(-1e-9) == "-0.000");
    CHECK(fixed3_formatted(0.0625) == "0.062");  // exact ties round half to even
    CHECK(fixed3_formatted(0.1875) == "0.188");
    CHECK(fixed3_formatted(0.0005) == "0.001");  // 0.0005 is a little above 1/2000
    CHECK(fixed3_formatted(1.0005) == "1.000");  // 1.0005 is a little below
    CHECK(fixed3_formatted(-2.0005) == "-2.001");
    CHECK(fixed3_formatted(12.3456) == "12.346");
    CHECK(fixed3_formatted(999999999999.9995) == "1000000000000.000");
    CHECK(fixed3_formatted(1e12) == "1000000000000.000");
    CHECK(fixed3_formatted(1e20) == "100000000000000000000.000");
    CHECK(fixed3_formatted(std::numeric_limits<double>::infinity()) == "inf");
    CHECK(fixed3_formatted(-std::numeric_limits<double>::infinity()) == "-inf");
    CHECK(fixed3_formatted(std::numeric_limits<double>::quiet_NaN()) == fixed3_reference(std::numeric_limits<double>::quiet_NaN()));
    CHECK(fixed3_formatted(std::numeric_limits<double>::max()) == fixed3_reference(std::numeric_limits<double>::max()));
    CHECK(fixed3_formatted(std::numeric_limits<double>::denorm_min()) == "0.000");
    for (double d : {0.0005, 1.0005, 2.5, 12.3456, -3.25, 1e-7, 123456789.987654, 1e20}) {
        char printf_form[400];
        std::snprintf(printf_form, sizeof printf_form, "%.3f", d);
        CHECK(fixed3_formatted(d) == printf_form);
    }

    // Many values against std::to_chars (which rounds as printf does): any bit pattern, values near
    // x.xxx5 and their neighbours, ordinary millisecond figures.
    std::mt19937_64 rng(7);
    int mismatches = 0;
    auto check = [&](double d) {
        if (fixed3_formatted(d) != fixed3_reference(d) && ++mismatches <= 10)
            FAIL_CHECK("value " << std::hexfloat << d << ": " << fixed3_formatted(d) << " want " << fixed3_reference(d));
    };
    for (int i = 0; i < 20000; ++i) {
        uint64_t bits = rng();
        double any;
        std::memcpy(&any, &bits, sizeof any);
        check(any);
        double half = (double(rng() % 2000000000000000ull) + 0.5) / 1000.0;
        check(half);
        check(-half);
        check(std::nextafter(half, 0.0));
        check(std::nextafter(half, 1e300));
        double small_half = (double(rng() % 100000) + 0.5) / 1000.0;
        check(small_half);
        check(std::nextafter(small_half, 0.0));
        check(std::nextafter(small_half, 1.0e300));
        check(std::ldexp(double(rng() >> 11), -int(rng() % 80)));
        check(double(rng() % 100000000) / 1e6);
    }
    CHECK(mismatches == 0);
}

TEST_CASE("a text line quotes values that hold a space, a quote or '=', and writes the rest as they are", "[log]") {
    log::configure(log::Level::Info, log::Format::Text);
    log::Correlation ids;
    std::snprintf(ids.trace_id, sizeof ids.trace_id, "%s", "4bf92f3577b34da6a3ce929d0e0e4736");
    std::snprintf(ids.span_id, sizeof ids.span_id, "%s", "00f067aa0ba902b7");
    std::string line;
    {
        log::Scope scope(&ids);
        log::format_line(line, log::Level::Error, "raw \"message\"",
                         {{"plain", "abc"}, {"space", "a b"}, {"eq", "a=b"}, {"quote", "a\"b"}, {"empty", ""},
                          {"ctl", "a\nb"}, {"n", 42}, {"d", 1.5}, {"b", true}});
    }
    CHECK(after_time(line, log::Format::Text) ==
          " error raw \"message\" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7 plain=abc "
          "space=\"a b\" eq=\"a=b\" quote=\"a\\\"b\" empty=\"\" ctl=a\\nb n=42 d=1.500 b=true\n");
    log::configure(log::Level::Info, log::Format::Json);
    // Ids shorter than full length are written as far as they go.
    std::snprintf(ids.trace_id, sizeof ids.trace_id, "%s", "abc");
    std::snprintf(ids.span_id, sizeof ids.span_id, "%s", "0123456789abcdef");
    line.clear();
    {
        log::Scope scope(&ids);
        log::format_line(line, log::Level::Info, "m", {});
    }
    CHECK(after_time(line, log::Format::Json) ==
          ",\"level\":\"info\",\"message\":\"m\",\"trace_id\":\"abc\",\"span_id\":\"0123456789abcdef\"}\n");
}
