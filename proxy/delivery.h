// At most once: what the balancer saw of a request it sent, decided from the socket rather than
// guessed, and whether the request may go to a worker again. docs/admission.md has the rule.
#pragma once

#include <cstdint>
#include <string_view>

#include "proxy/failure_policy.h"

namespace stepflow {

namespace http1 {
struct Head;
}

// How far a request got before its connection ended without a response.
enum class Delivery : uint8_t {
    NotRead,     // the worker provably did not read it all: the send failed before the last byte
                 // left, or the worker reset the connection (the kernel resets only a socket
                 // closed with unread data, or one our bytes reach after it closed)
    MayHaveRun,  // an orderly close (FIN) after the whole request left, or response bytes came:
                 // the worker may have read it and started the call
};

// `reset`: the connection ended in an error (RST) rather than an orderly close. `all_sent`: the
// request's last byte left our side. `response_seen`: any response byte came (an interim one
// included).
Delivery observe_delivery(bool reset, bool all_sent, bool response_seen);

// After an orderly close: whether a reset followed it. A worker that closed before our request
// reached it answers the request with a reset (kept as the socket's pending error, EPIPE or
// ECONNRESET), which proves it never read it. One getsockopt, on the failure path only.
bool reset_followed_close(int fd);

// The failure a close before the response head is, given what was observed.
Failure close_failure(Delivery d, bool reused_connection);

// RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT and DELETE may be repeated without harm.
bool idempotent_method(std::string_view method);

// A request that may be sent again even after a worker may have read it: idempotent by method,
// or carrying an Idempotency-Key header (when `trust_idempotency_key`, --retry-idempotent).
bool may_repeat(const http1::Head& request, bool trust_idempotency_key);

}  // namespace stepflow
