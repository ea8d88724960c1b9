// Splits a watch stream's de-chunked payload into lines. A watch event is one JSON document per
// line, but the network cuts the stream anywhere: an event can span several reads (and several
// HTTP chunks), and one read can carry several events. Only whole lines are handed on, so no
// event is ever parsed half.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>

struct evbuffer;

namespace stepflow {

class LineSplitter {
public:
    explicit LineSplitter(size_t max_line = 16 * 1024 * 1024);
    ~LineSplitter();
    LineSplitter(const LineSplitter&) = delete;
    LineSplitter& operator=(const LineSplitter&) = delete;

    // Takes all of `payload` (it is drained) and calls on_line for each completed, non-empty line
    // (without its "\n" or "\r\n"). on_line returns false to stop early; the rest stays buffered.
    // Returns false when a line grows past max_line (the stream is then unusable).
    bool feed(evbuffer* payload, const std::function<bool(std::string_view)>& on_line);
    bool feed(std::string_view bytes, const std::function<bool(std::string_view)>& on_line);
    // Bytes of a line still waiting for its end.
    size_t pending() const;

private:
    bool drain_lines(const std::function<bool(std::string_view)>& on_line);

    size_t max_line_;
    evbuffer* buffer_;
    size_t scanned_ = 0;  // bytes at the front already known to hold no "\n"
    std::string line_;
};

}  // namespace stepflow
