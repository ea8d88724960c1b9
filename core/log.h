// Structured logging to stderr: one line per record, JSON or text, lowercase levels.
// Written here rather than with spdlog because every record carries typed key/value fields that
// must come out as one JSON object; a small formatter (core/log_format.h) writes them into a
// per-thread buffer, and a writer thread writes many lines per write(2).
#pragma once

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <variant>

struct event_base;

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

// The trace a record belongs to: while a Scope naming one is open on this thread, every record
// carries trace_id and span_id (lowercase hex), so log lines join the spans of their request.
struct Correlation {
    char trace_id[33] = {};  // empty: none
    char span_id[17] = {};
    bool empty() const { return trace_id[0] == 0; }
};
class Scope {
public:
    explicit Scope(const Correlation* c);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

private:
    const Correlation* saved_;
};

// While one is open on this thread, records are stamped with `at`, a steady_clock reading the
// caller already took, turned into wall-clock time with an offset read once a second: the
// access log's record takes its time from the reading that measured the request, one clock
// read fewer per request (a precise read costs 25-50 ns on these VMs).
class At {
public:
    explicit At(std::chrono::steady_clock::time_point at);
    ~At();
    At(const At&) = delete;
    At& operator=(const At&) = delete;

private:
    const std::chrono::steady_clock::time_point* saved_;
    std::chrono::steady_clock::time_point at_;
};

// Formats one record and queues it for the writer thread; never blocks on the sink. When
// --log-buffer-lines records already wait, the batch is dropped and its records counted instead.
void write(Level level, std::string_view message, std::initializer_list<Field> fields = {});
// One record as a line, newline included (what write() queues).
void format_line(std::string& out, Level level, std::string_view message, std::initializer_list<Field> fields);

// An event-loop thread calls attach_loop() before running its loop: its records then collect in
// a per-thread buffer handed to the writer thread once per loop turn (or when large), instead of
// one lock and wake per record. detach_loop() hands over what is left (before the loop is freed).
void attach_loop(event_base* base);
void detach_loop();

void set_buffer_lines(size_t lines);
uint64_t dropped_lines();  // records dropped because the queue was full, since start
uint64_t batches_handed();  // batches taken by the writer's queue, since start (tests)
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
