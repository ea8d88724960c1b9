// A client connection speaking HTTP/1.1: reads request heads, hands each to the connection's
// Request (proxy/request.h: routing, local and failure answers, the record), frames the request
// body up and the response back, pipelining and keeping the connection alive between requests,
// and answers malformed input itself without contacting a worker.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "core/http1.h"
#include "core/timers.h"
#include "proxy/client.h"
#include "proxy/exchange.h"
#include "proxy/local_response.h"
#include "proxy/request.h"

struct event;
struct evbuffer;

namespace stepflow {

class Conn;

class LoopThread;

class ClientH1 final : public ClientConnection, public RequestFraming {
public:
    // Takes over `transport` (plain or TLS), which may already hold the first bytes of a request.
    ClientH1(LoopThread& thread, Conn* transport, std::string client_ip, bool tls);
    ~ClientH1() override;
    // Serves what arrived with the connection (the protocol sniffer's bytes).
    void start();

    void drain() override;
    void close_now() override;

    // Downstream
    void start_response(int status, std::string_view reason, const std::vector<http1::Header>& headers,
                        http1::Framing upstream_framing, uint64_t content_length, bool& chunked_out) override;
    void interim_response(int status, std::string_view reason) override;
    evbuffer* response_sink() override;
    void response_data() override;
    bool response_sink_full() override;
    void response_done() override;
    void exchange_failed(Failure failure, const char* why, bool response_started) override;
    void request_sink_ready() override;

    // RequestFraming
    void send_answer(const LocalAnswer& answer) override;
    void break_response(bool cancelled) override;
    bool read_body_for_id() override;
    void body_timed_out() override;

private:
    enum class State {
        Idle,         // between requests, nothing received yet
        ReadingHead,  // part of a head received
        Proxying,     // an exchange is under way
        LocalBody,    // reading a request body to answer it ourselves
        Closing,      // flushing the last bytes, then close
    };

    static void on_read(Conn*, void* arg);
    static void on_write(Conn*, void* arg);
    static void on_event(Conn*, short what, void* arg);
    static void on_next(int, short, void* arg);

    void process_input();
    void parse_head();
    void pump_request_body();
    const char* precheck_chunked_body();
    void collect_local_body();
    void answer_locally();
    void answer_after_body();
    void finish_request();
    void enter_idle();
    void send_error(int status, const char* why);
    void send_local(int status, std::string_view content_type, const std::string& body, std::string_view extra_headers);
    void close_after_flush();
    void linger();
    void destroy();
    void arm_timer(Millis ms);
    void timed_out();
    void client_gone();
    void defer();
    void log_access();

    LoopThread& thread_;
    Conn* transport_ = nullptr;
    event* next_ = nullptr;  // see defer()
    std::string client_ip_;
    bool tls_;
    State state_ = State::Idle;
    bool keep_alive_ = true;
    bool draining_ = false;
    bool served_ = false;  // a request was answered on this connection
    bool destroying_ = false;
    bool request_done_ = false;
    bool exchange_paused_ = false;  // the worker is not being read until the client catches up
    size_t scan_from_ = 0;

    http1::BodyPump request_pump_;
    evbuffer* local_body_ = nullptr;  // a body read only for a local answer's JSON-RPC id
    Request request_{*this, thread_, client_ip_, tls_};  // the current one (reused for the next)
};

}  // namespace stepflow
