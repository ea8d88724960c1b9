#include "core/log.h"

#include "core/log_format.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <deque>
#include <mutex>
#include <thread>
#include <sys/uio.h>
#include <unistd.h>
#include <vector>

#include <event2/event.h>

namespace stepflow::log {
namespace {

std::atomic<Level> g_level{Level::Info};
thread_local const Correlation* t_correlation = nullptr;
thread_local const std::chrono::steady_clock::time_point* t_at = nullptr;  // see At
std::atomic<Format> g_format{Format::Json};

// Lines go to a bounded queue that one writer thread drains to stderr, so a slow or stuck log
// sink (a full pipe, a paused collector) never blocks an event loop: when the queue is full the
// line is dropped and counted. Leaked on purpose: the writer may still run while the process exits.
class Sink {
public:
    // `text` holds `lines` whole lines: one event-loop turn's records, or one record from a
    // thread without a loop. One lock and at most one wake per batch, not per record. `text` is
    // taken and replaced with an empty buffer the writer has finished with, so that a loop in
    // steady state allocates nothing per batch: a fresh buffer per turn, freed by the writer
    // thread, kept the heap growing and shrinking (about one page fault per 70 requests).
    void push(std::string& text, size_t lines) {
        bool wake;
        {
            std::lock_guard lock(mutex_);
            if (!started_) {
                started_ = true;
                std::thread([this] { run(); }).detach();
            }
            if (queued_ + lines > capacity_.load(std::memory_order_relaxed)) {
                dropped_.fetch_add(lines, std::memory_order_relaxed);
                text.clear();
                return;
            }
            batches_.fetch_add(1, std::memory_order_relaxed);
            // The writer sleeps until lines come, then gathers for up to kGather (or kWakeLines
            // lines) before writing: under load that is one wake and one write(2) per many loop
            // turns instead of a futex wake and a context switch per turn.
            size_t before = queued_;
            queued_ += lines;
            size_t enough = wake_lines();
            wake = (before == 0 && idle_) || (before < enough && queued_ >= enough);
            lines_.push_back(std::move(text));
            text = std::string();
            if (!spare_.empty()) {
                text.swap(spare_.back());
                spare_.pop_back();
            }
        }
        if (wake) wake_.notify_one();
    }

    // Waits (at most `limit`) until every queued line was written: at exit, so the last lines are
    // not lost, yet a sink nobody reads cannot keep the process from ending.
    void flush(std::chrono::milliseconds limit) {
        std::unique_lock lock(mutex_);
        ++flushing_;
        wake_.notify_one();
        drained_.wait_for(lock, limit, [this] { return queued_ == 0 && !writing_; });
        --flushing_;
    }

    void set_capacity(size_t lines) { capacity_.store(lines, std::memory_order_relaxed); }
    uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
    uint64_t batches() const { return batches_.load(std::memory_order_relaxed); }

private:
    void run() {
        std::deque<std::string> batch;
        uint64_t reported = 0;
        for (;;) {
            {
                std::unique_lock lock(mutex_);
                // The buffers just written go back to the loops, emptied (their capacity kept).
                for (auto& b : batch) {
                    if (spare_.size() >= kSpares) break;
                    if (b.capacity() > kSpareBytes) continue;
                    b.clear();
                    spare_.push_back(std::move(b));
                }
                batch.clear();
                writing_ = false;
                if (queued_ == 0) drained_.notify_all();
                idle_ = true;
                wake_.wait(lock, [this] { return queued_ > 0; });
                idle_ = false;
                wake_.wait_for(lock, kGather, [this] { return queued_ >= wake_lines() || flushing_ > 0; });
                batch.swap(lines_);
                queued_ = 0;
                writing_ = true;
            }
            uint64_t dropped = dropped_.load(std::memory_order_relaxed);
            if (dropped != reported) {
                // Say so in the log itself once the sink takes lines again.
                std::string notice;
                notice.reserve(120);
                format_line(notice, Level::Warn, "log lines dropped: the log sink was too slow",
                            {{"dropped_total", dropped}, {"dropped", dropped - reported}});
                batch.push_back(std::move(notice));
                reported = dropped;
            }
            write_all(batch);
        }
    }

    // The batches as they are, with writev(2): no copy into one buffer first.
    static void write_all(const std::deque<std::string>& batches) {
        constexpr size_t kVecs = 64;
        iovec vec[kVecs];
        auto next = batches.begin();
        size_t used = 0;
        while (next != batches.end() || used > 0) {
            for (; used < kVecs && next != batches.end(); ++next)
                if (!next->empty()) vec[used++] = {const_cast<char*>(next->data()), next->size()};
            if (used == 0) break;
            ssize_t n = ::writev(STDERR_FILENO, vec, int(used));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return;  // stderr is gone or broken: nothing more can be said there
            // Drop what was written; a partial write leaves the rest of a piece first.
            size_t left = size_t(n), done = 0;
            while (done < used && left >= vec[done].iov_len) left -= vec[done++].iov_len;
            if (done < used) {
                vec[done].iov_base = static_cast<char*>(vec[done].iov_base) + left;
                vec[done].iov_len -= left;
            }
            std::copy(vec + done, vec + used, vec);
            used -= done;
        }
    }

    std::mutex mutex_;
    std::condition_variable wake_, drained_;
    std::deque<std::string> lines_;  // batches of whole lines
    std::vector<std::string> spare_;  // written batches' buffers, empty, for push() to hand back
    size_t queued_ = 0;              // lines in them
    bool started_ = false, writing_ = false;
    bool idle_ = false;              // the writer waits for a first line
    int flushing_ = 0;               // flush() callers waiting: write now
    static constexpr size_t kWakeLines = 512;
    static constexpr std::chrono::milliseconds kGather{20};
    // Enough spare buffers for the loops' turns between two writes (a turn's batch is a few KiB
    // under load); larger ones, from a burst, are freed, so at most 1 MiB is kept.
    static constexpr size_t kSpares = 64;
    static constexpr size_t kSpareBytes = 16 * 1024;
    // A quarter of the queue at most, so a small --log-buffer-lines does not drop while gathering.
    size_t wake_lines() const {
        return std::max<size_t>(1, std::min(kWakeLines, capacity_.load(std::memory_order_relaxed) / 4));
    }
    std::atomic<size_t> capacity_{10000};
    std::atomic<uint64_t> dropped_{0};
    std::atomic<uint64_t> batches_{0};
};

Sink& sink() {
    static Sink* s = new Sink;
    return *s;
}

constexpr std::string_view level_name(Level l) {
    switch (l) {
    case Level::Trace: return "trace";
    case Level::Debug: return "debug";
    case Level::Info: return "info";
    case Level::Warn: return "warn";
    case Level::Error: return "error";
    }
    return "info";
}

// `","level":"<level>","message":"` for each level, padded to 32 bytes: a JSON line copies its
// level's piece whole in two moves.
struct LevelPiece {
    char text[32];
    size_t size;
};
constexpr auto kJsonLevelPieces = [] {
    std::array<LevelPiece, 5> pieces{};
    for (size_t l = 0; l < pieces.size(); ++l) {
        auto& piece = pieces[l];
        for (std::string_view part : {std::string_view("\",\"level\":\""), level_name(Level(l)), std::string_view("\",\"message\":\"")})
            for (char c : part) piece.text[piece.size++] = c;
    }
    return pieces;
}();
constexpr size_t kJsonLevelMax = sizeof LevelPiece::text;

char* put_json_level(char* p, Level level) {
    auto l = static_cast<size_t>(level);
    const LevelPiece& piece = kJsonLevelPieces[l < kJsonLevelPieces.size() ? l : size_t(Level::Info)];
    std::memcpy(p, piece.text, sizeof piece.text);
    return p + piece.size;
}

// The second's "YYYY-MM-DDTHH:MM:SS." is formatted once per second and thread; a record adds
// only its microseconds (gmtime_r and snprintf per record were a third of a line's cost).
constexpr size_t kTimeMax = 32 + 7;

int64_t micros_since_epoch(auto time_point) {
    return std::chrono::duration_cast<std::chrono::microseconds>(time_point.time_since_epoch()).count();
}

// Wall-clock microseconds at the steady time `at`. The offset between the clocks is read again
// once `at` is a second past the last reading (or before it), so a step of the wall clock shows
// within a second.
int64_t wall_micros_at(std::chrono::steady_clock::time_point at) {
    thread_local int64_t offset = 0;
    thread_local int64_t read_at = 0;
    thread_local bool have_offset = false;
    int64_t steady = micros_since_epoch(at);
    if (!have_offset || steady < read_at || steady - read_at >= 1000000) {
        have_offset = true;
        int64_t wall_now = micros_since_epoch(std::chrono::system_clock::now());
        read_at = micros_since_epoch(std::chrono::steady_clock::now());
        offset = wall_now - read_at;
    }
    return steady + offset;
}

char* put_time(char* p) {
    thread_local int64_t cached_sec = -1;
    thread_local char prefix[32];
    thread_local size_t prefix_len = 0;
    int64_t micros_total = t_at ? wall_micros_at(*t_at) : micros_since_epoch(std::chrono::system_clock::now());
    int64_t sec = micros_total / 1000000;
    int64_t micros = micros_total % 1000000;
    if (micros < 0) {
        micros += 1000000;
        --sec;
    }
    if (sec != cached_sec) {
        std::time_t secs = static_cast<std::time_t>(sec);
        std::tm tm{};
        gmtime_r(&secs, &tm);
        int n = std::snprintf(prefix, sizeof prefix, "%04d-%02d-%02dT%02d:%02d:%02d.", tm.tm_year + 1900,
                              tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        prefix_len = n > 0 ? std::min(size_t(n), sizeof prefix - 1) : 0;
        cached_sec = sec;
    }
    std::memcpy(p, prefix, sizeof prefix);  // whole: a fixed-size copy is two moves
    p += prefix_len;
    auto us = static_cast<unsigned>(micros);
    p = detail::put_pair(p, us / 10000);
    p = detail::put_pair(p, us / 100 % 100);
    p = detail::put_pair(p, us % 100);
    return put(p, 'Z');
}

// What the fast paths write at most: time, level, keys, quotes, numbers, unescaped strings.
size_t expected_size(std::string_view message, const Correlation* ids, std::initializer_list<Field> fields) {
    // {"time":"<time>","level":"<level>","message":"<message>"}\n and ,"trace_id":"<33>","span_id":"<17>"
    // (put_id copies the ids' arrays whole)
    size_t n = 9 + kTimeMax + kJsonLevelMax + message.size() + 3 + (ids ? 13 + 33 + 13 + 17 + 1 : 0);
    for (const auto& f : fields) {
        n += f.key.size() + 6;  // ,"<key>":"<string>"
        // -9223372036854775808 is 20; fixed3's fast path writes 18 at most
        n += f.value.index() == 0 ? std::get<std::string_view>(f.value).size() : 20;
    }
    return n;
}

[[gnu::always_inline]] inline char* put_value(LineWriter& out, char* p, const Field& f, bool json) {
    switch (f.value.index()) {
    case 0: {
        auto s = std::get<std::string_view>(f.value);
        bool quote = json || s.empty() || s.find_first_of(" \"=") != std::string_view::npos;
        if (quote) p = put(p, '"');
        p = out.escaped(p, s);
        if (quote) p = put(p, '"');
        return p;
    }
    case 1: return put_integer(p, std::get<int64_t>(f.value));
    case 2: return out.fixed3(p, std::get<double>(f.value));  // as "%.3f"
    case 3: return std::get<bool>(f.value) ? put(p, "true") : put(p, "false");
    }
    return p;
}

}  // namespace

bool parse_level(std::string_view s, Level& out) {
    static constexpr std::pair<std::string_view, Level> names[] = {
        {"trace", Level::Trace}, {"debug", Level::Debug}, {"info", Level::Info},
        {"warn", Level::Warn},   {"warning", Level::Warn}, {"error", Level::Error}};
    for (auto& [name, level] : names)
        if (s == name) { out = level; return true; }
    return false;
}

bool parse_format(std::string_view s, Format& out) {
    if (s == "json") { out = Format::Json; return true; }
    if (s == "text") { out = Format::Text; return true; }
    return false;
}

void configure(Level level, Format format) {
    g_level.store(level);
    g_format.store(format);
}

bool enabled(Level level) { return level >= g_level.load(std::memory_order_relaxed); }

void append_json_escaped(std::string& out, std::string_view s) {
    LineWriter w(out, s.size());
    w.finish(w.escaped(w.begin(), s));
}

// One pass of raw pointer writes into room made once (see core/log_format.h).
void format_line(std::string& line, Level level, std::string_view message, std::initializer_list<Field> fields) {
    const Correlation* ids = t_correlation && !t_correlation->empty() ? t_correlation : nullptr;
    LineWriter out(line, expected_size(message, ids, fields));
    char* p = out.begin();
    if (g_format.load(std::memory_order_relaxed) == Format::Json) {
        p = put(p, "{\"time\":\"");
        p = put_time(p);
        p = put_json_level(p, level);
        p = out.escaped(p, message);
        p = put(p, '"');
        if (ids) {
            p = put(p, ",\"trace_id\":\"");
            p = put_id(p, ids->trace_id);
            p = put(p, "\",\"span_id\":\"");
            p = put_id(p, ids->span_id);
            p = put(p, '"');
        }
        for (const auto& f : fields) {
            p = put(p, ",\"");
            p = out.escaped(p, f.key);
            p = put(p, "\":");
            p = put_value(out, p, f, true);
        }
        p = put(p, "}\n");
    } else {
        p = put_time(p);
        p = put(p, ' ');
        p = put(p, level_name(level));
        p = put(p, ' ');
        p = put(p, message);
        if (ids) {
            p = put(p, " trace_id=");
            p = put_id(p, ids->trace_id);
            p = put(p, " span_id=");
            p = put_id(p, ids->span_id);
        }
        for (const auto& f : fields) {
            p = put(p, ' ');
            p = put(p, f.key);
            p = put(p, '=');
            p = put_value(out, p, f, false);
        }
        p = put(p, '\n');
    }
    out.finish(p);
}

namespace {

// Records written on an event-loop thread collect here and go to the sink once per loop turn (an
// event made active by the first record of the turn runs after the turn's other callbacks) or
// as soon as the buffer grows past kHandOffBytes.
struct ThreadBuffer {
    std::string text;
    size_t lines = 0;
    event* hand_off = nullptr;  // null: the thread has no loop, records go one at a time
    bool scheduled = false;

    void flush() {
        scheduled = false;
        if (lines == 0) return;
        sink().push(text, lines);  // hands back an empty buffer, usually one used before
        lines = 0;
        if (text.capacity() < 4096) text.reserve(4096);
    }
};
constexpr size_t kHandOffBytes = 64 * 1024;
thread_local ThreadBuffer t_buffer;

void on_hand_off(int, short, void*) { t_buffer.flush(); }

}  // namespace

void attach_loop(event_base* base) {
    if (t_buffer.hand_off) return;
    t_buffer.hand_off = event_new(base, -1, 0, on_hand_off, nullptr);
    t_buffer.text.reserve(4096);
}

void detach_loop() {
    t_buffer.flush();
    if (t_buffer.hand_off) event_free(t_buffer.hand_off);
    t_buffer.hand_off = nullptr;
}

void write(Level level, std::string_view message, std::initializer_list<Field> fields) {
    ThreadBuffer& tb = t_buffer;
    if (!tb.hand_off) {
        std::string line;
        line.reserve(160);
        format_line(line, level, message, fields);
        sink().push(line, 1);
        return;
    }
    format_line(tb.text, level, message, fields);
    ++tb.lines;
    if (tb.text.size() >= kHandOffBytes) {
        tb.flush();
    } else if (!tb.scheduled) {
        tb.scheduled = true;
        event_active(tb.hand_off, 0, 0);
    }
}

Scope::Scope(const Correlation* c) : saved_(t_correlation) {
    if (c && !c->empty()) t_correlation = c;
}
Scope::~Scope() { t_correlation = saved_; }

At::At(std::chrono::steady_clock::time_point at) : saved_(t_at), at_(at) { t_at = &at_; }
At::~At() { t_at = saved_; }

void set_buffer_lines(size_t lines) { sink().set_capacity(lines); }
uint64_t dropped_lines() { return sink().dropped(); }
uint64_t batches_handed() { return sink().batches(); }
void flush(std::chrono::milliseconds limit) { sink().flush(limit); }

}  // namespace stepflow::log
