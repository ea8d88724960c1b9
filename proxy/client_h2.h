// A client connection speaking HTTP/2 (h2c with prior knowledge, or h2 over TLS). Each stream
// is one request through the same Exchange, routing and metrics as HTTP/1.1. Flow control runs
// both ways: a request body is acknowledged to the client only as the worker takes it, and a
// response body is read from the worker only as the client's window lets it out.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nghttp2/nghttp2.h>

#include "core/timers.h"
#include "proxy/client.h"
#include "proxy/exchange.h"
#include "proxy/local_response.h"
#include "proxy/request_record.h"

struct event;
struct evbuffer;

namespace stepflow {

class Conn;

class LoopThread;

class ClientH2 final : public ClientConnection {
public:
    ClientH2(LoopThread& thread, Conn* transport, std::string client_ip, bool tls);
    ~ClientH2() override;

    void drain() override;
    void close_now() override;

    class Stream;

private:
    friend class Stream;
    static void on_read(Conn*, void* arg);
    static void on_write(Conn*, void* arg);
    static void on_event(Conn*, short what, void* arg);
    static void on_deferred(int, short, void* arg);
    static void on_idle(void* arg);
    static void on_header_block_timeout(void* arg);

    // nghttp2 callbacks
    static int on_begin_frame(nghttp2_session*, const nghttp2_frame_hd*, void*);
    static int on_begin_headers(nghttp2_session*, const nghttp2_frame*, void*);
    static int on_header(nghttp2_session*, const nghttp2_frame*, const uint8_t*, size_t, const uint8_t*, size_t, uint8_t,
                         void*);
    static int on_frame_recv(nghttp2_session*, const nghttp2_frame*, void*);
    static int on_data_chunk(nghttp2_session*, uint8_t, int32_t, const uint8_t*, size_t, void*);
    static int on_frame_send(nghttp2_session*, const nghttp2_frame*, void*);
    static int on_stream_close(nghttp2_session*, int32_t, uint32_t, void*);
    static int on_send_data(nghttp2_session*, nghttp2_frame*, const uint8_t*, size_t, nghttp2_data_source*, void*);

    void receive();
    void send();             // write what nghttp2 has to send, bounded by the socket's pace
    void schedule_send();    // send() after the current callback chain unwinds
    void stream_closed(Stream* stream);
    void maybe_close();
    void destroy();
    void arm_idle();
    void free_closed();
    // Stream buffers: an empty one is kept for the connection's next stream instead of freed.
    evbuffer* take_buffer();
    void give_buffer(evbuffer* b);

    LoopThread& thread_;
    Conn* transport_;
    std::string client_ip_;
    bool tls_;
    nghttp2_session* session_ = nullptr;
    event* deferred_ = nullptr;
    Deadline idle_{on_idle, this};  // no stream open for --keepalive-idle-timeout
    Deadline header_block_{on_header_block_timeout, this};  // a header block left open
    Stream* streams_ = nullptr;  // open streams (owned; linked through Stream::prev_/next_)
    size_t stream_count_ = 0;
    // Stream ids the client skipped, which it may never open (see on_begin_frame).
    static constexpr size_t kMaxSkippedRanges = 16;
    int32_t last_opened_ = -1;  // highest stream id the client opened
    std::vector<std::pair<int32_t, int32_t>> skipped_;  // [low, high], odd ids
    Stream* closed_ = nullptr;   // freed once no callback of theirs is on the stack (free_closed)
    Stream* receiving_ = nullptr;  // the stream whose request header block is being read
    bool resumes_pending_ = false;  // a stream's response may be read from its worker again
    std::vector<evbuffer*> spare_buffers_;
    bool draining_ = false;
    bool destroying_ = false;
    bool settings_sent_ = false;  // our first SETTINGS frame went out (see send())
    std::vector<nghttp2_nv> nva_;  // scratch for a response head (Stream::start_response)
    std::string names_;            // its lower-cased names
};

}  // namespace stepflow
