// Structured logging to stderr: one line per record, JSON or text, lowercase levels.
// Written here rather than with spdlog because every record carries typed key/value fields that
// must come out as one JSON object; a small formatter does that with one write(2) per line.
#pragma once

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <variant>

namespace stepflow::log {

enum class Level { Trace, Debug, Info, Warn, Error };
enum class Format { Json, Text };

bool parse_level(std::string_view s, Level& out);
bool parse_format(std::string_view s, Format& out);
void configure(Level level, Format format);
bool enabled(Level level);

struct Field {
    Field(std::string_view k, std::string_view v) : key(k), value(v) {}
    Field(std::string_view k, const char* v) : key(k), value(std::string_view(v ? v : "")) {}
    Field(std::string_view k, const std::string& v) : key(k), value(std::string_view(v)) {}
    Field(std::string_view k, int64_t v) : key(k), value(v) {}
    Field(std::string_view k, int v) : key(k), value(int64_t(v)) {}
    Field(std::string_view k, unsigned v) : key(k), value(int64_t(v)) {}
    Field(std::string_view k, uint64_t v) : key(k), value(int64_t(v)) {}
    Field(std::string_view k, long long v) : key(k), value(int64_t(v)) {}
    Field(std::string_view k, double v) : key(k), value(v) {}
    Field(std::string_view k, bool v) : key(k), value(v) {}
    std::string_view key;
    std::variant<std::string_view, int64_t, double, bool> value;
};

// Formats one record and queues it for the writer thread; never blocks on the sink. When
// --log-buffer-lines records already wait, the record is dropped and counted instead.
void write(Level level, std::string_view message, std::initializer_list<Field> fields = {});
// One record as a line, newline included (what write() queues).
void format_line(std::string& out, Level level, std::string_view message, std::initializer_list<Field> fields);

void set_buffer_lines(size_t lines);
uint64_t dropped_lines();  // records dropped because the queue was full, since start
// Waits at most `limit` for the queued records to reach stderr (call before exiting).
void flush(std::chrono::milliseconds limit);

inline void trace(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Trace)) write(Level::Trace, m, f); }
inline void debug(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Debug)) write(Level::Debug, m, f); }
inline void info(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Info)) write(Level::Info, m, f); }
inline void warn(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Warn)) write(Level::Warn, m, f); }
inline void error(std::string_view m, std::initializer_list<Field> f = {}) { if (enabled(Level::Error)) write(Level::Error, m, f); }

// Appends s to out as the body of a JSON string (no quotes), escaping as RFC 8259 requires.
void append_json_escaped(std::string& out, std::string_view s);

}  // namespace stepflow::log
