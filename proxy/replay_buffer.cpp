#include "proxy/replay_buffer.h"

#include <cstdio>

#include <event2/buffer.h>

#include "proxy/local_response.h"

namespace stepflow {

ReplayBuffer::~ReplayBuffer() {
    if (buf_) evbuffer_free(buf_);
}

bool ReplayBuffer::room_for(size_t n) {
    consumed_ = true;
    if (overflow_) return false;
    if (!buf_) buf_ = evbuffer_new();
    if (evbuffer_get_length(buf_) + n <= limit_) return true;
    overflow_ = true;  // too large to keep: streamed, not retried
    evbuffer_free(buf_);
    buf_ = nullptr;
    return false;
}

void ReplayBuffer::keep(const void* data, size_t n) {
    if (n == 0 || !room_for(n)) return;
    evbuffer_add(buf_, data, n);
}

void ReplayBuffer::payload(evbuffer* from, size_t n) {
    if (n == 0 || !room_for(n)) return;
    // Copied once, straight into the buffer's own space (no temporary per chunk).
    evbuffer_iovec space;
    if (evbuffer_reserve_space(buf_, static_cast<ev_ssize_t>(n), &space, 1) != 1) return;
    space.iov_len = n;
    evbuffer_copyout(from, space.iov_base, n);
    evbuffer_commit_space(buf_, &space, 1);
}

size_t ReplayBuffer::size() const { return buf_ ? evbuffer_get_length(buf_) : 0; }

void ReplayBuffer::resend(evbuffer* out, bool chunked, bool ended) const {
    if (overflow_) return;
    size_t n = size();
    if (n > 0) {
        if (chunked) {
            char line[24];
            int len = std::snprintf(line, sizeof line, "%zx\r\n", n);
            evbuffer_add(out, line, static_cast<size_t>(len));
        }
        evbuffer_add(out, evbuffer_pullup(buf_, static_cast<ev_ssize_t>(n)), n);
        if (chunked) evbuffer_add(out, "\r\n", 2);
    }
    if (chunked && ended) evbuffer_add(out, "0\r\n\r\n", 5);
}

std::string_view ReplayBuffer::view() {
    if (!buf_) return {};
    size_t n = evbuffer_get_length(buf_);
    return {reinterpret_cast<const char*>(evbuffer_pullup(buf_, -1)), n};
}

std::string ReplayBuffer::id_json() const {
    if (!buf_ || overflow_) return "";
    return jsonrpc_id_of(buf_);
}

}  // namespace stepflow
