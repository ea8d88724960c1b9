#include "proxy/delivery.h"

#include <sys/socket.h>

#include <cerrno>

#include "core/http1.h"

namespace stepflow {

Delivery observe_delivery(bool reset, bool all_sent, bool response_seen) {
    if (response_seen) return Delivery::MayHaveRun;  // it answered something: it read the request
    if (!all_sent) return Delivery::NotRead;         // a call needs the whole request
    return reset ? Delivery::NotRead : Delivery::MayHaveRun;
}

bool reset_followed_close(int fd) {
    if (fd < 0) return false;
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) return false;
    return err == ECONNRESET || err == EPIPE;
}

Failure close_failure(Delivery d, bool reused_connection) {
    if (d == Delivery::MayHaveRun) return Failure::MayHaveRun;
    // Not read: on a pooled connection, the worker had closed it (the benign stale race).
    return reused_connection ? Failure::PooledClosedUnread : Failure::ResetBeforeResponse;
}

bool idempotent_method(std::string_view m) {
    return m == "GET" || m == "HEAD" || m == "OPTIONS" || m == "TRACE" || m == "PUT" || m == "DELETE";
}

bool may_repeat(const http1::Head& request, bool trust_idempotency_key) {
    if (idempotent_method(request.method)) return true;
    return trust_idempotency_key && !request.get("Idempotency-Key").empty();
}

}  // namespace stepflow
