#include "proxy/conn.h"

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "core/net.h"

namespace stepflow {
namespace {

// One recv per readable event, into a buffer sized by what recent reads brought: small for
// requests and SSE events (so thousands of quiet streams hold no large buffers, and the heap
// does not balloon while they start at once), growing quickly for bulk bodies. The smallest
// size keeps libevent's chain (payload plus its header, rounded up to a power of two) at 1 KiB,
// which malloc serves from its per-thread cache: a proxied request allocates four of them.
constexpr size_t kMinRead = 1024 - 80;
constexpr size_t kMaxRead = 64 * 1024;

bool would_block(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == EINTR; }

// recv(2) and send(2) through syscall(2): glibc's wrappers are cancellation points, which
// update the thread's cancellation state atomically before and after each call; no thread of
// ours is ever cancelled.
ssize_t recv_some(int fd, void* buf, size_t len) { return syscall(SYS_recvfrom, fd, buf, len, 0, nullptr, nullptr); }
ssize_t send_some(int fd, const void* buf, size_t len) {
    return syscall(SYS_sendto, fd, buf, len, MSG_NOSIGNAL, nullptr, 0);
}

}  // namespace

Conn* Conn::plain(Loop& loop, int fd) {
    auto* c = new Conn(loop);
    c->init_plain(fd, false);
    return c;
}

Conn* Conn::connect(Loop& loop, const sockaddr* addr, socklen_t len) {
    int fd = ::socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return nullptr;
    auto* c = new Conn(loop);
    c->init_plain(fd, true);
    if (::connect(fd, addr, len) != 0 && errno != EINPROGRESS) {
        if (local_resource_error(errno)) {
            // No local port left for this worker (EADDRNOTAVAIL) and alike: our shortage, which
            // the caller must not charge to the worker as a failed connect.
            int err = errno;
            delete c;
            errno = err;
            return nullptr;
        }
        // Reported from the loop (see on_writable), after the caller has set its callbacks.
        c->failed_ = true;
        event_active(c->write_event(), EV_WRITE, 0);
        return c;
    }
    // Writable once the connection is up (or has failed): see on_writable.
    event_add(c->write_event(), nullptr);
    c->write_armed_ = true;
    return c;
}

Conn* Conn::connect_tls(Loop& loop, SSL* ssl, const sockaddr* addr, socklen_t len) {
    bufferevent* bev =
        bufferevent_openssl_socket_new(loop.base, -1, ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
    if (!bev) return nullptr;
    Conn* c = tls(loop, bev);
    if (bufferevent_socket_connect(bev, addr, static_cast<int>(len)) != 0) {
        delete c;
        return nullptr;
    }
    c->fd_ = bufferevent_getfd(bev);
    return c;
}

Conn* Conn::tls(Loop& loop, bufferevent* bev) {
    auto* c = new Conn(loop);
    c->tls_ = bev;
    c->fd_ = bufferevent_getfd(bev);
    c->in_ = bufferevent_get_input(bev);
    c->out_ = bufferevent_get_output(bev);
    bufferevent_setcb(bev, tls_read, tls_write, tls_event, c);
    return c;
}

void Conn::init_plain(int fd, bool connecting) {
    fd_ = fd;
    connecting_ = connecting;
    in_ = evbuffer_new();
    out_ = evbuffer_new();
    read_ev_ = event_new(loop_.base, fd, EV_READ | EV_PERSIST, on_readable, this);
#ifndef NDEBUG
    // Test builds check that nothing writes output without the outbox knowing (it would wait
    // for the next write, or forever).
    evbuffer_add_cb(out_, check_output_queued, this);
#endif
}

// The write event is made on first use (and dropped once a connect completes): most
// connections never fill the kernel's send buffer, and a few thousand quiet streams should not
// carry one.
event* Conn::write_event() {
    if (!write_ev_) write_ev_ = event_new(loop_.base, fd_, EV_WRITE | EV_PERSIST, on_writable, this);
    return write_ev_;
}

Conn::~Conn() {
    if (tls_) {
        // End the session with close_notify (RFC 8446 §6.1), so the peer can tell our close
        // from a truncation. One non-blocking attempt: the socket closes right after either way.
        SSL* ssl = bufferevent_openssl_get_ssl(tls_);
        if (ssl && !failed_ && SSL_is_init_finished(ssl) && !(SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN)) {
            SSL_shutdown(ssl);
            ERR_clear_error();  // whatever it left must not show up on another connection
        }
        bufferevent_free(tls_);
        return;
    }
    if (queued_) loop_.outbox.remove(this);
    event_free(read_ev_);
    if (write_ev_) event_free(write_ev_);
    evbuffer_free(in_);
    evbuffer_free(out_);
    if (fd_ >= 0) ::close(fd_);
}

SSL* Conn::ssl() const { return tls_ ? bufferevent_openssl_get_ssl(tls_) : nullptr; }

void Conn::set_callbacks(DataCallback read, DataCallback write, EventCallback event, void* arg) {
    read_cb_ = read;
    write_cb_ = write;
    event_cb_ = event;
    arg_ = arg;
}

// TLS output is written by the bufferevent, so its send timeout is the bufferevent's write
// timeout (which has the same meaning); the others are ours for both kinds.
void Conn::clear_tls_send_timeout() {
    if (tls_ && timeout_kind_ == Timeout::Send) bufferevent_set_timeouts(tls_, nullptr, nullptr);
}

void Conn::set_idle_timeout(Millis after) {
    clear_tls_send_timeout();
    timeout_ = after;
    timeout_kind_ = Timeout::Idle;
    deadline_.cancel();
    update_deadline();
}

void Conn::set_send_timeout(Millis after) {
    timeout_ = after;
    timeout_kind_ = Timeout::Send;
    deadline_.cancel();
    if (tls_) {
        timeval tv = to_timeval(after);
        bufferevent_set_timeouts(tls_, nullptr, after.count() > 0 ? &tv : nullptr);
        return;
    }
    update_deadline();
}

void Conn::set_deadline(Millis after) {
    clear_tls_send_timeout();
    timeout_ = after;
    timeout_kind_ = Timeout::Deadline;
    deadline_.arm(loop_.timers, after);
}

bool Conn::waiting(size_t output) const {
    bool output_waits = !failed_ && output > 0;
    if (timeout_kind_ == Timeout::Send) return output_waits;
    return reading_ || connecting_ || output_waits;
}

// Idle and send timeouts run only while there is something to wait for: a stream paused because
// its client reads slowly is not idle on the worker's side, and a client with nothing to take
// is not slow.
void Conn::update_deadline() {
    if (timeout_kind_ == Timeout::Deadline || timeout_.count() <= 0) return;  // before the length
    update_deadline(evbuffer_get_length(out_));
}

void Conn::update_deadline(size_t output) {
    if (timeout_kind_ == Timeout::Deadline || timeout_.count() <= 0) return;
    if (tls_ && timeout_kind_ == Timeout::Send) return;
    bool want = waiting(output);
    if (want == deadline_.armed()) return;
    if (want) deadline_.arm(loop_.timers, timeout_);
    else deadline_.cancel();
}

void Conn::progress(bool wrote) {
    if (timeout_kind_ == Timeout::Idle || (wrote && timeout_kind_ == Timeout::Send)) deadline_.restart();
}

void Conn::on_deadline(void* arg) {
    auto* self = static_cast<Conn*>(arg);
    bool writing = self->connecting_ || (!self->reading_ && evbuffer_get_length(self->out_) > 0);
    self->report(short(BEV_EVENT_TIMEOUT | (writing ? BEV_EVENT_WRITING : BEV_EVENT_READING)));
}

void Conn::set_watermark(short events, size_t low, size_t high) {
    if (tls_) {
        bufferevent_setwatermark(tls_, events, low, high);
        return;
    }
    if (events & EV_READ) {
        if (high && !read_high_) evbuffer_add_cb(in_, on_input_drained, this);  // resumes reading
        read_high_ = static_cast<uint32_t>(high);
        update_read_event();
    }
    if (events & EV_WRITE) write_low_ = static_cast<uint32_t>(low);
}

void Conn::enable(short events) {
    if (events & EV_READ) reading_ = true;
    update_deadline();
    if (tls_) {
        bufferevent_enable(tls_, events);
        return;
    }
    if (events & EV_READ) update_read_event();
    if ((events & EV_WRITE) && !write_enabled_) {
        // Pending output goes when the socket is next writable; new output is written by the
        // deferred callback as usual.
        write_enabled_ = true;
        if (evbuffer_get_length(out_) > 0 && !write_armed_ && !connecting_) {
            event_add(write_event(), nullptr);
            write_armed_ = true;
        }
    }
}

void Conn::disable(short events) {
    if (events & EV_READ) reading_ = false;
    update_deadline();
    if (tls_) {
        bufferevent_disable(tls_, events);
        return;
    }
    if (events & EV_READ) update_read_event();
    if (events & EV_WRITE) {
        write_enabled_ = false;
        if (write_armed_ && !connecting_) {
            event_del(write_ev_);
            write_armed_ = false;
        }
    }
}

void Conn::update_read_event() {
    bool want = reading_ && !connecting_ && !failed_ && !(read_high_ && evbuffer_get_length(in_) >= read_high_);
    if (want == read_armed_) return;
    if (want) event_add(read_ev_, nullptr);
    else event_del(read_ev_);
    read_armed_ = want;
}

// What evbuffer_write() does, with send(2) rather than writev(2) for what is small: a head and a
// small body sit in two or three buffer chains, and copying them together here costs less than
// the kernel's iovec import and file-position lookup of writev(2).
int Conn::write_some() {
    constexpr int kVecs = 16;
    constexpr size_t kGather = 4096;
    evbuffer_iovec vec[kVecs];
    // With a negative length evbuffer_peek fills at most kVecs: chains past those wait for the
    // next call.
    int used = evbuffer_peek(out_, -1, nullptr, vec, kVecs);
    if (used <= 0) return 0;
    size_t total = 0;
    for (int i = 0; i < used; ++i) total += vec[i].iov_len;
    ssize_t n;
    if (used == 1) {
        n = send_some(fd_, vec[0].iov_base, total);
    } else if (total <= kGather) {
        char gathered[kGather];
        size_t at = 0;
        for (int i = 0; i < used; ++i) {
            std::memcpy(gathered + at, vec[i].iov_base, vec[i].iov_len);
            at += vec[i].iov_len;
        }
        n = send_some(fd_, gathered, total);
    } else {
        iovec iov[kVecs];
        for (int i = 0; i < used; ++i) iov[i] = {vec[i].iov_base, vec[i].iov_len};
        n = ::writev(fd_, iov, used);
    }
    if (n > 0) evbuffer_drain(out_, size_t(n));
    return int(n);
}

size_t Conn::flush(size_t left) {
    if (connecting_ || failed_ || !write_enabled_) return left;
    while (left > 0) {
        int n = write_some();
        if (n > 0) {
            left -= size_t(n);
            progress(true);
            continue;
        }
        if (n < 0 && !would_block(errno)) failed_ = true;
        break;
    }
    bool pending = left > 0 && !failed_;
    if (pending != write_armed_) {
        if (pending) event_add(write_event(), nullptr);
        else event_del(write_ev_);
        write_armed_ = pending;
    }
    update_deadline(left);
    return left;
}

size_t Conn::output_length() const { return evbuffer_get_length(out_); }

void Conn::queue() {
    queued_ = true;
    loop_.outbox.add(this);
}

void Conn::check_output_queued([[maybe_unused]] evbuffer*, [[maybe_unused]] const evbuffer_cb_info* info,
                               [[maybe_unused]] void* arg) {
    assert(info->n_added == 0 || static_cast<Conn*>(arg)->queued_);
}

void Conn::send_queued() {
    queued_ = false;
    size_t before = evbuffer_get_length(out_);
    size_t after = flush(before);
    if (failed_) return report(BEV_EVENT_ERROR | BEV_EVENT_WRITING);
    if (after < before && after <= write_low_ && write_cb_) write_cb_(this, arg_);  // last: may free us
}

void Conn::on_input_drained(evbuffer*, const evbuffer_cb_info* info, void* arg) {
    auto* self = static_cast<Conn*>(arg);
    if (info->n_deleted > 0 && self->read_high_ && !self->read_armed_) self->update_read_event();
}

void Conn::on_readable(int fd, short, void* arg) {
    auto* self = static_cast<Conn*>(arg);
    size_t want = self->read_size_;
    if (self->read_high_) {
        size_t have = evbuffer_get_length(self->in_);
        if (have >= self->read_high_) return self->update_read_event();
        want = std::min(want, size_t(self->read_high_) - have);
    }
    evbuffer_iovec vec[2];
    int nvec = evbuffer_reserve_space(self->in_, static_cast<ev_ssize_t>(want), vec, 2);
    iovec iov[2];
    for (int i = 0; i < nvec; ++i) iov[i] = {vec[i].iov_base, vec[i].iov_len};
    // One piece of room (the usual case) is read with recv(2): readv(2) costs the kernel an iovec
    // import and a file-position lookup that a socket call does not make.
    ssize_t n = nvec == 1 ? recv_some(fd, iov[0].iov_base, iov[0].iov_len) : ::readv(fd, iov, nvec);
    if (n <= 0) {
        evbuffer_commit_space(self->in_, vec, 0);
        if (n < 0 && would_block(errno)) return;
        self->failed_ = n < 0;
        self->reading_ = false;
        self->update_read_event();
        return self->report(short(BEV_EVENT_READING | (n == 0 ? BEV_EVENT_EOF : BEV_EVENT_ERROR)));
    }
    if (size_t(n) == want) self->read_size_ = uint32_t(std::min<size_t>(size_t(self->read_size_) * 2, kMaxRead));
    else if (size_t(n) < want / 4) self->read_size_ = uint32_t(std::max<size_t>(self->read_size_ / 2, kMinRead));
    size_t left = size_t(n);
    for (int i = 0; i < nvec; ++i) {
        vec[i].iov_len = std::min(vec[i].iov_len, left);
        left -= vec[i].iov_len;
    }
    evbuffer_commit_space(self->in_, vec, nvec);
    self->progress(false);
    Outbox& outbox = self->loop_.outbox;
    if (self->read_cb_) self->read_cb_(self, self->arg_);  // the callback may free us
    outbox.flush();  // what it (and whatever it called) wrote goes now
}

void Conn::on_writable(int fd, short, void* arg) {
    auto* self = static_cast<Conn*>(arg);
    if (self->connecting_) {
        int err = 0;
        socklen_t len = sizeof err;
        if (!self->failed_) getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (self->failed_ || err != 0) {
            if (err != 0) errno = err;
            self->failed_ = true;
            event_del(self->write_ev_);
            self->write_armed_ = false;
            return self->report(BEV_EVENT_ERROR);
        }
        self->connecting_ = false;
        // Connected: the write event goes until the kernel next pushes back.
        event_free(self->write_ev_);
        self->write_ev_ = nullptr;
        self->write_armed_ = false;
        self->progress(true);
        self->update_read_event();
        self->flush(evbuffer_get_length(self->out_));
        Outbox& outbox = self->loop_.outbox;
        self->report(BEV_EVENT_CONNECTED);  // may free us
        outbox.flush();                      // the request head it wrote goes now
        return;
    }
    size_t left = self->flush(evbuffer_get_length(self->out_));
    if (self->failed_) return self->report(BEV_EVENT_ERROR | BEV_EVENT_WRITING);
    if (left <= self->write_low_ && self->write_cb_) {
        Outbox& outbox = self->loop_.outbox;
        self->write_cb_(self, self->arg_);  // may free us
        outbox.flush();
    }
}

void Conn::report(short what) {
    if (event_cb_) event_cb_(this, what, arg_);  // last: the callback may free us
}

void Conn::tls_read(bufferevent*, void* arg) {
    auto* self = static_cast<Conn*>(arg);
    self->progress(false);
    if (self->read_cb_) self->read_cb_(self, self->arg_);
}

void Conn::tls_write(bufferevent*, void* arg) {
    auto* self = static_cast<Conn*>(arg);
    self->progress(true);
    self->update_deadline();
    if (self->write_cb_) self->write_cb_(self, self->arg_);
}

void Conn::tls_event(bufferevent*, short what, void* arg) {
    auto* self = static_cast<Conn*>(arg);
    if (what & BEV_EVENT_CONNECTED) self->progress(true);
    if (what & BEV_EVENT_ERROR) self->failed_ = true;  // no close_notify after a TLS error
    self->report(what);
}

}  // namespace stepflow
