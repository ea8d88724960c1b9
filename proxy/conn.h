// A non-blocking connection with libevent buffers, used on the data path in place of libevent's
// bufferevent. The API mirrors the few bufferevent calls we need; what differs is the cost: a
// plain socket reads straight into its input buffer with one recv (no FIONREAD ioctl first),
// and output is written as soon as the current callbacks have run instead of after a round trip
// through epoll, so EV_WRITE is armed only while the kernel pushes back. A proxied request then
// costs one recv and one send per side and no epoll_ctl. TLS connections delegate to a
// bufferevent_openssl (the TLS library does the I/O there).
#pragma once

#include <cstddef>
#include <cstdint>

#include <sys/socket.h>

#include "core/timers.h"
#include "proxy/outbox.h"

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

    // Adopts a connected socket.
    static Conn* plain(Loop& loop, int fd);
    // Connects a new socket; reports BEV_EVENT_CONNECTED or BEV_EVENT_ERROR through the event
    // callback. nullptr when no socket could be created.
    static Conn* connect(Loop& loop, const sockaddr* addr, socklen_t len);
    // Takes over a bufferevent_openssl (accepting or connecting).
    static Conn* tls(Loop& loop, bufferevent* bev);
    // A TLS connection to `addr`; the handshake completes before BEV_EVENT_CONNECTED.
    static Conn* connect_tls(Loop& loop, SSL* ssl, const sockaddr* addr, socklen_t len);
    ~Conn();
    Conn(const Conn&) = delete;
    Conn& operator=(const Conn&) = delete;

    evbuffer* input() const { return in_; }
    // For writing, and asked for at each write (never kept): the connection joins the loop's
    // outbox, which sends what was added once the current callbacks return. An evbuffer
    // callback did this before, but libevent runs it on every add and drain: about 600
    // instructions per proxied request.
    evbuffer* output() {
        if (!queued_ && !tls_) queue();
        return out_;
    }
    size_t output_length() const;
    int fd() const { return fd_; }
    SSL* ssl() const;

    void set_callbacks(DataCallback read, DataCallback write, EventCallback event, void* arg);
    // All report BEV_EVENT_TIMEOUT, with BEV_EVENT_WRITING while connecting or while output
    // waits and nothing is being read, else with BEV_EVENT_READING. Each replaces the others;
    // zero clears. Idle: no byte moves either way for this long while there is something to
    // wait for (reading is enabled, output waits, or a connect). Send: output waits and none of
    // it is taken for this long. Deadline: this long from now, whatever moves.
    void set_idle_timeout(Millis after);
    void set_send_timeout(Millis after);
    void set_deadline(Millis after);
    // EV_READ: stop reading while `high` bytes wait in input (0: no limit). EV_WRITE: the write
    // callback runs when output drains to `low` or less.
    void set_watermark(short events, size_t low, size_t high);
    void enable(short events);
    void disable(short events);

private:
    explicit Conn(Loop& loop) : loop_(loop), deadline_(on_deadline, this) {}
    friend class Outbox;
    void send_queued();  // Outbox::flush: write what was queued, report a failure
    static void on_readable(int, short, void* arg);
    static void on_writable(int, short, void* arg);
    static void on_deadline(void* arg);
    void queue();
    static void check_output_queued(evbuffer*, const evbuffer_cb_info* info, void* arg);
    static void on_input_drained(evbuffer*, const evbuffer_cb_info* info, void* arg);
    static void tls_read(bufferevent*, void* arg);
    static void tls_write(bufferevent*, void* arg);
    static void tls_event(bufferevent*, short what, void* arg);
    void init_plain(int fd, bool connecting);
    event* write_event();
    void update_read_event();
    int write_some();  // one send(2) or writev(2) of the output; what write(2) returns
    // Writes what output holds (`left` bytes, which the caller knew); arms EV_WRITE only if the
    // kernel would block; returns what is left. The length is carried along rather than asked
    // for again: evbuffer_get_length was called 14 times per proxied request here.
    size_t flush(size_t left);
    bool waiting(size_t output) const;
    void update_deadline();
    void update_deadline(size_t output);  // `output`: the output's length, known to the caller
    void clear_tls_send_timeout();
    void progress(bool wrote);
    void report(short what);

    // Ordered largest first so that a few thousand open streams pay no padding.
    Loop& loop_;
    bufferevent* tls_ = nullptr;
    evbuffer* in_ = nullptr;
    evbuffer* out_ = nullptr;
    event* read_ev_ = nullptr;
    event* write_ev_ = nullptr;
    DataCallback read_cb_ = nullptr, write_cb_ = nullptr;
    EventCallback event_cb_ = nullptr;
    void* arg_ = nullptr;
    Deadline deadline_;
    Millis timeout_{0};
    int fd_ = -1;
    uint32_t read_size_ = 1024 - 80;   // adapts between about 1 and 64 KiB (see on_readable)
    uint32_t read_high_ = 0, write_low_ = 0;  // watermarks: at most 4 GiB
    enum class Timeout : uint8_t { Deadline, Idle, Send } timeout_kind_ = Timeout::Deadline;
    bool reading_ = false;       // EV_READ enabled by the user
    bool read_armed_ = false;    // read event registered with the loop
    bool write_armed_ = false;   // write event registered (kernel buffer full, or connecting)
    bool connecting_ = false;
    bool write_enabled_ = true;
    bool failed_ = false;
    bool queued_ = false;        // in the outbox
};

}  // namespace stepflow
