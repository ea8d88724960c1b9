// The request body's payload as the client side pumped it to a worker (before any chunk
// framing), kept up to --retry-buffer-size so a retry on another instance can send it again and a
// failure answer can echo the request's JSON-RPC id. Over the bound it is dropped: the request
// is then streamed and not retried.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "core/http1.h"

struct evbuffer;

namespace stepflow {

class ReplayBuffer final : public http1::BodyTap {
public:
    explicit ReplayBuffer(size_t limit) : limit_(limit) {}
    ~ReplayBuffer();
    ReplayBuffer(const ReplayBuffer&) = delete;
    ReplayBuffer& operator=(const ReplayBuffer&) = delete;

    // Payload bytes on their way to the worker.
    void keep(const void* data, size_t n);
    void payload(evbuffer* from, size_t n) override;  // the first `n` bytes of `from`
    // The body's end framing went out (a chunked body's last chunk): the body left the client
    // even when it had no payload.
    void end_sent() { consumed_ = true; }

    // Body bytes went to a worker (the client no longer holds them all).
    bool consumed() const { return consumed_; }
    // All the worker was sent is kept: a retry may send it again.
    bool complete() const { return !overflow_; }
    size_t size() const;
    // Appends the kept payload to `out`, chunk-framed when `chunked` (with the last chunk when
    // `ended`): what a new attempt sends before the rest of the body follows.
    void resend(evbuffer* out, bool chunked, bool ended) const;
    std::string_view view();  // the kept payload, contiguous
    std::string id_json() const;  // the JSON-RPC id, "" when not known

private:
    bool room_for(size_t n);

    size_t limit_;
    evbuffer* buf_ = nullptr;
    bool overflow_ = false;
    bool consumed_ = false;
};

}  // namespace stepflow
