#include "discovery/k8s_line_splitter.h"

#include <event2/buffer.h>

namespace stepflow {

LineSplitter::LineSplitter(size_t max_line) : max_line_(max_line), buffer_(evbuffer_new()) {}

LineSplitter::~LineSplitter() { evbuffer_free(buffer_); }

size_t LineSplitter::pending() const { return evbuffer_get_length(buffer_); }

bool LineSplitter::feed(evbuffer* payload, const std::function<bool(std::string_view)>& on_line) {
    evbuffer_add_buffer(buffer_, payload);  // moves the chains, no copy
    return drain_lines(on_line);
}

bool LineSplitter::feed(std::string_view bytes, const std::function<bool(std::string_view)>& on_line) {
    evbuffer_add(buffer_, bytes.data(), bytes.size());
    return drain_lines(on_line);
}

bool LineSplitter::drain_lines(const std::function<bool(std::string_view)>& on_line) {
    while (true) {
        size_t len = evbuffer_get_length(buffer_);
        if (scanned_ >= len) break;
        evbuffer_ptr from;
        evbuffer_ptr_set(buffer_, &from, scanned_, EVBUFFER_PTR_SET);
        evbuffer_ptr nl = evbuffer_search(buffer_, "\n", 1, &from);
        if (nl.pos < 0) {
            scanned_ = len;  // next search starts where this one ended
            break;
        }
        size_t line_len = static_cast<size_t>(nl.pos);
        line_.resize(line_len);
        evbuffer_remove(buffer_, line_.data(), line_len);
        evbuffer_drain(buffer_, 1);
        scanned_ = 0;
        if (!line_.empty() && line_.back() == '\r') line_.pop_back();
        if (line_.empty()) continue;
        if (line_.size() > max_line_) return false;
        if (!on_line(line_)) return true;
    }
    return evbuffer_get_length(buffer_) <= max_line_;
}

}  // namespace stepflow
