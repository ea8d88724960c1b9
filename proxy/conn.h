// A non-blocking connection with libevent buffers, used on the data path in place of libevent's
// bufferevent. The API mirrors the few bufferevent calls we need; what differs is the cost: a
// plain socket reads straight into its input buffer with one recv (no FIONREAD ioctl first),
// and output is written as soon as the current callbacks have run instead of after a round trip
// through epoll, so EV_WRITE is armed only while the kernel pushes back. A proxied request then
// costs one recv and one send per side and no epoll_ctl. TLS connections delegate to a
// bufferevent_openssl (the TLS library does the I/O there).
#pragma once

#include <cstddef>

#include <sys/socket.h>
#include <sys/time.h>

struct bufferevent;
struct event;
struct event_base;
struct evbuffer;
struct evbuffer_cb_info;
typedef struct ssl_st SSL;

namespace stepflow {

class Conn {
public:
    using DataCallback = void (*)(Conn*, void*);
    using EventCallback = void (*)(Conn*, short what, void*);  // BEV_EVENT_* flags

    // Adopts a connected (or connecting, see connect()) socket.
    static Conn* plain(event_base* base, int fd);
    // Connects a new socket; reports BEV_EVENT_CONNECTED or BEV_EVENT_ERROR through the event
    // callback. nullptr when no socket could be created.
    static Conn* connect(event_base* base, const sockaddr* addr, socklen_t len);
    // Takes over a bufferevent_openssl (accepting or connecting).
    static Conn* tls(bufferevent* bev);
    // A TLS connection to `addr`; the handshake completes before BEV_EVENT_CONNECTED.
    static Conn* connect_tls(event_base* base, SSL* ssl, const sockaddr* addr, socklen_t len);
    ~Conn();
    Conn(const Conn&) = delete;
    Conn& operator=(const Conn&) = delete;

    evbuffer* input() const { return in_; }
    evbuffer* output() const { return out_; }
    int fd() const { return fd_; }
    SSL* ssl() const;

    void set_callbacks(DataCallback read, DataCallback write, EventCallback event, void* arg);
    // read: no bytes arrive for this long while reading (BEV_EVENT_TIMEOUT|READING); write:
    // pending output (or a connect) makes no progress for this long. nullptr: none.
    void set_timeouts(const timeval* read, const timeval* write);
    // EV_READ: stop reading while `high` bytes wait in input (0: no limit). EV_WRITE: the write
    // callback runs when output drains to `low` or less.
    void set_watermark(short events, size_t low, size_t high);
    void enable(short events);
    void disable(short events);

private:
    explicit Conn(event_base* base) : base_(base) {}
    static void on_readable(int, short, void* arg);
    static void on_writable(int, short, void* arg);
    static void on_timer(int, short, void* arg);
    static void on_output_added(evbuffer*, const evbuffer_cb_info* info, void* arg);
    static void on_input_drained(evbuffer*, const evbuffer_cb_info* info, void* arg);
    static void tls_read(bufferevent*, void* arg);
    static void tls_write(bufferevent*, void* arg);
    static void tls_event(bufferevent*, short what, void* arg);
    void init_plain(int fd, bool connecting);
    event* write_event();
    event* timer();
    void update_read_event();
    void flush();  // write what output holds; arm EV_WRITE only if the kernel would block
    void arm_timer();
    void report(short what);

    event_base* base_;
    bufferevent* tls_ = nullptr;
    int fd_ = -1;
    evbuffer* in_ = nullptr;
    evbuffer* out_ = nullptr;
    event* read_ev_ = nullptr;
    event* write_ev_ = nullptr;
    event* timer_ = nullptr;
    DataCallback read_cb_ = nullptr, write_cb_ = nullptr;
    EventCallback event_cb_ = nullptr;
    void* arg_ = nullptr;
    size_t read_high_ = 0, write_low_ = 0;
    size_t read_size_ = 2 * 1024;  // adapts between 2 and 64 KiB (see on_readable)
    timeval read_timeout_{}, write_timeout_{};
    bool has_read_timeout_ = false, has_write_timeout_ = false;
    timeval last_read_{}, last_write_{};
    bool reading_ = false;       // EV_READ enabled by the user
    bool read_armed_ = false;    // read event registered with the loop
    bool write_armed_ = false;   // write event registered (kernel buffer full, or connecting)
    bool connecting_ = false;
    bool timer_armed_ = false;
    bool write_enabled_ = true;
    bool failed_ = false;
};

}  // namespace stepflow
