#include "proxy/client_h1.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "core/config.h"
#include "core/log.h"
#include "proxy/conn.h"
#include "proxy/local_response.h"
#include "proxy/loop_thread.h"

namespace stepflow {
namespace {

constexpr size_t kOutputHighWater = 256 * 1024;  // stop reading the worker beyond this
constexpr size_t kOutputLowWater = 64 * 1024;    // ... and resume below this
constexpr Millis kLingerTime{2000};

}  // namespace

ClientH1::ClientH1(LoopThread& thread, Conn* transport, std::string client_ip, bool tls)
    : thread_(thread), transport_(transport), client_ip_(std::move(client_ip)), tls_(tls) {
    transport_->set_callbacks(on_read, on_write, on_event, this);
    // Reading pauses by itself once this much waits unforwarded: the client's bytes stay in the
    // kernel until the worker takes what we already have.
    size_t high = std::max<size_t>(thread.config().max_header_size + 1, kOutputHighWater);
    transport_->set_watermark(EV_READ, 0, high);
    transport_->enable(EV_READ | EV_WRITE);
    arm_timer(thread.config().request_header_timeout);
}

void ClientH1::start() { process_input(); }

ClientH1::~ClientH1() {
    request_.drop_exchange();
    if (local_body_) evbuffer_free(local_body_);
    if (next_) event_free(next_);
    if (transport_) delete transport_;
}

// The connection's own deadline serves as this connection's single timer: the client side
// needs one only between requests, while a head arrives, and while lingering.
void ClientH1::arm_timer(Millis ms) { transport_->set_deadline(ms); }

// Runs process_input (or the deferred delete) once the current callback chain has unwound. The
// event is made on first use: most connections never need it before they close.
void ClientH1::defer() {
    if (!next_) next_ = event_new(thread_.base(), -1, 0, on_next, this);
    event_active(next_, 0, 0);
}

void ClientH1::on_read(Conn*, void* arg) { static_cast<ClientH1*>(arg)->process_input(); }

void ClientH1::on_write(Conn*, void* arg) {
    auto* self = static_cast<ClientH1*>(arg);
    if (self->state_ == State::Closing) {
        if (self->transport_->output_length() == 0) self->linger();
        return;
    }
    if (self->exchange_paused_ && self->request_.exchange()) {
        self->exchange_paused_ = false;
        self->transport_->set_watermark(EV_WRITE, 0, 0);
        self->request_.exchange()->resume_response();
    }
}

void ClientH1::on_event(Conn*, short what, void* arg) {
    auto* self = static_cast<ClientH1*>(arg);
    if (what & BEV_EVENT_TIMEOUT) return self->timed_out();
    if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))) return;
    self->client_gone();
}

void ClientH1::client_gone() {
    if (state_ == State::Proxying && request_.exchange()) {
        request_.cancel(499);
        log_access();
    }
    destroy();
}

void ClientH1::timed_out() {
    switch (state_) {
    case State::Idle: destroy(); break;  // keep-alive idle time is over
    case State::ReadingHead:
        // The head never completed: a request of its own in the log, not the previous one's.
        request_.begin();
        send_error(408, "request head not received in time");
        break;
    case State::Closing: destroy(); break;  // linger time is over, or the last bytes were not taken
    case State::Proxying:
    case State::LocalBody:
        // --client-send-timeout: the response waits and the client takes none of it.
        log::debug("client send timeout", {{"client", client_ip_}});
        client_gone();
        break;
    }
}

void ClientH1::on_next(int, short, void* arg) {
    auto* self = static_cast<ClientH1*>(arg);
    if (self->destroying_) {
        self->thread_.connection_closed(self);
        delete self;
        return;
    }
    self->process_input();
}

void ClientH1::process_input() {
    if (destroying_) return;
    evbuffer* in = transport_->input();
    switch (state_) {
    case State::Idle:
    case State::ReadingHead: parse_head(); break;
    case State::Proxying: pump_request_body(); break;
    case State::LocalBody: collect_local_body(); break;
    case State::Closing: evbuffer_drain(in, evbuffer_get_length(in)); break;
    }
}

void ClientH1::parse_head() {
    evbuffer* in = transport_->input();
    if (evbuffer_get_length(in) == 0) return;
    if (state_ == State::Idle) {
        state_ = State::ReadingHead;
        arm_timer(thread_.config().request_header_timeout);
    }
    const Config& cfg = thread_.config();
    size_t n = http1::find_head_end(in, cfg.max_header_size, scan_from_);
    if (n == 0) return;
    request_.begin();
    http1::Head& head = request_.head;
    scan_from_ = 0;
    if (n == SIZE_MAX) {
        send_error(431, "request head too large");
        return;
    }
    head.raw.resize(n);
    evbuffer_remove(in, head.raw.data(), n);
    if (auto err = http1::parse_request(head, {cfg.max_header_size, cfg.max_headers})) {
        send_error(err.status, err.reason);
        return;
    }
    if (head.framing == http1::Framing::Chunked) {
        if (const char* why = precheck_chunked_body()) {
            send_error(400, why);
            return;
        }
    }
    transport_->set_send_timeout(cfg.client_send_timeout);  // in place of the head's deadline
    keep_alive_ = head.keep_alive && !draining_;
    request_done_ = head.framing == http1::Framing::None;
    request_pump_.start(head.framing, head.content_length, head.framing == http1::Framing::Chunked);

    state_ = State::Proxying;
    log::Scope ids(request_.start_trace());
    if (request_.route()) return;
    answer_after_body();
}

// Answers locally once the body is read (for its JSON-RPC id), or at once when there is none.
void ClientH1::answer_after_body() {
    state_ = State::LocalBody;
    if (request_done_ || request_.head.expect_continue) {
        // No body to read, or the client waits for our go-ahead: answer now.
        if (!request_done_) keep_alive_ = false;
        answer_locally();
        return;
    }
    local_body_ = evbuffer_new();
    request_pump_.start(request_.head.framing, request_.head.content_length, false);
    request_.await_body_for_id();  // in all, not between bytes
    collect_local_body();
}

// Checks the chunk framing that arrived with the head before any worker is contacted, so the
// common malformed case (a bad first chunk size) never reaches one. Later chunks are checked as
// they stream; a bad one then cuts the exchange.
const char* ClientH1::precheck_chunked_body() {
    evbuffer* in = transport_->input();
    size_t n = std::min<size_t>(evbuffer_get_length(in), 4096);
    if (n == 0) return nullptr;
    evbuffer* copy = evbuffer_new();
    evbuffer* scratch = evbuffer_new();
    evbuffer_add(copy, evbuffer_pullup(in, static_cast<ssize_t>(n)), n);
    http1::BodyPump check;
    check.start(http1::Framing::Chunked, 0, false);
    const char* why = check.pump(copy, scratch) == http1::BodyPump::Status::Error ? check.error() : nullptr;
    evbuffer_free(copy);
    evbuffer_free(scratch);
    return why;
}

void ClientH1::pump_request_body() {
    Exchange* exchange = request_.exchange();
    if (state_ != State::Proxying || request_done_ || !exchange) return;
    evbuffer* sink = exchange->request_sink();
    // Not connected yet, or the worker has not taken what it was given: the bytes wait in our
    // input buffer, whose read watermark then stops reading the client (back-pressure, as on
    // HTTP/2). The exchange calls request_sink_ready once the worker's side drains.
    if (!sink || exchange->request_sink_full()) {
        request_.stop_awaiting_body();  // waiting for the worker is not the client's delay
        return;
    }
    evbuffer* in = transport_->input();
    uint64_t before = request_pump_.payload_bytes();
    auto status = request_pump_.pump(in, sink, exchange->replay_copy());
    RequestRecord& record = request_.record;
    record.bytes_in = request_pump_.payload_bytes();
    if (status == http1::BodyPump::Status::More && (record.bytes_in != before || !request_.awaiting_body()))
        request_.await_body();
    if (status == http1::BodyPump::Status::Error) {
        const char* why = request_pump_.error();
        request_.abandon();
        keep_alive_ = false;
        if (record.status == 0) {
            send_error(400, why);
        } else {
            log_access();
            close_after_flush();
        }
        return;
    }
    if (status == http1::BodyPump::Status::Done) {
        request_done_ = true;
        request_.stop_awaiting_body();
        thread_.series().body_received(record.bytes_in);
        exchange->request_body_done();
    }
}

void ClientH1::request_sink_ready() { pump_request_body(); }

void ClientH1::collect_local_body() {
    evbuffer* in = transport_->input();
    auto status = request_pump_.pump(in, local_body_);
    request_.record.bytes_in = request_pump_.payload_bytes();
    if (status == http1::BodyPump::Status::Error) {
        send_error(400, request_pump_.error());
        return;
    }
    if (status == http1::BodyPump::Status::Done) {
        request_done_ = true;
        answer_locally();
    } else if (evbuffer_get_length(local_body_) > kLocalBodyLimit) {
        keep_alive_ = false;  // answer without the id and without reading the rest, then close
        evbuffer_drain(local_body_, evbuffer_get_length(local_body_));
        answer_locally();
    }
}

void ClientH1::answer_locally() {
    std::string id = local_body_ ? jsonrpc_id_of(local_body_) : "null";  // an empty body: null
    if (local_body_) {
        evbuffer_free(local_body_);
        local_body_ = nullptr;
    }
    request_.answer_locally(id);
}

// A failed exchange whose body never left the client: read it for its id, as for a routing miss.
bool ClientH1::read_body_for_id() {
    if (request_done_) return false;
    answer_after_body();
    return true;
}

// The client stopped sending its request body (or, for a local answer, took too long to send
// the body we read for its id).
void ClientH1::body_timed_out() {
    if (destroying_ || request_done_) return;
    keep_alive_ = false;
    if (state_ == State::LocalBody) {
        evbuffer_drain(local_body_, evbuffer_get_length(local_body_));
        answer_locally();  // without the id
        return;
    }
    if (state_ != State::Proxying || !request_.exchange()) return;
    log::Scope ids(request_.record.trace.correlation());
    log::debug("request body timeout", {{"client", client_ip_}});
    request_.give_up_on_body();
}

void ClientH1::send_answer(const LocalAnswer& answer) {
    if (!request_done_) keep_alive_ = false;  // the rest of the body is not read
    std::string extra;
    if (answer.retry_after) extra = "Retry-After: " + std::to_string(thread_.config().retry_after_seconds) + "\r\n";
    send_local(answer.status, "application/json", answer.body, extra);
    finish_request();
}

// The response had started: end the connection without the closing framing.
void ClientH1::break_response(bool) {
    keep_alive_ = false;
    log_access();
    close_after_flush();
}

void ClientH1::send_local(int status, std::string_view content_type, const std::string& body,
                          std::string_view extra_headers) {
    RequestRecord& record = request_.record;
    record.status = status;
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " + http1::status_reason(status) + "\r\n";
    out.append("Content-Type: ");
    out.append(content_type);
    out.append("\r\nContent-Length: ");
    out.append(std::to_string(body.size()));
    out.append("\r\n");
    out.append(extra_headers);
    if (!keep_alive_) out.append("Connection: close\r\n");
    out.append("\r\n");
    out.append(body);
    evbuffer_add(transport_->output(), out.data(), out.size());
    record.bytes_out = body.size();
}

void ClientH1::send_error(int status, const char* why) {
    keep_alive_ = false;
    request_.reject(status, why);
}

void ClientH1::finish_request() {
    served_ = true;
    request_.stop_awaiting_body();
    log_access();
    if (!keep_alive_ || !request_done_ || draining_) {
        close_after_flush();
        return;
    }
    enter_idle();
}

void ClientH1::enter_idle() {
    state_ = State::Idle;
    arm_timer(thread_.config().keepalive_idle_timeout);
    if (evbuffer_get_length(transport_->input()) > 0) defer();  // a pipelined request is buffered
}

void ClientH1::log_access() { request_.log_access(); }

void ClientH1::close_after_flush() {
    state_ = State::Closing;
    transport_->set_send_timeout(thread_.config().client_send_timeout);  // the last bytes must be taken too
    transport_->set_watermark(EV_WRITE, 0, 0);
    if (transport_->output_length() == 0) linger();
    // else on_write lingers once the output has drained
}

// Everything is sent: half-close and keep reading (and discarding) for a while, so client bytes
// still in flight do not turn our last response into a reset. TLS has its own close_notify.
void ClientH1::linger() {
    if (tls_) {
        destroy();
        return;
    }
    shutdown(transport_->fd(), SHUT_WR);
    arm_timer(kLingerTime);
}

void ClientH1::destroy() {
    if (destroying_) return;
    destroying_ = true;
    transport_->disable(EV_READ | EV_WRITE);
    arm_timer(Millis(0));
    defer();  // delete once the current callback chain has unwound
}

void ClientH1::drain() {
    draining_ = true;
    // Idle between requests: close now (a client retries a request on a reused connection that
    // closed before answering). One that has not sent its first request yet gets it served.
    if (state_ == State::Idle && served_) destroy();
    else keep_alive_ = false;
}

void ClientH1::close_now() {
    if (Exchange* exchange = request_.exchange()) exchange->abort();
    thread_.connection_closed(this);
    delete this;
}

void ClientH1::start_response(int status, std::string_view reason, const std::vector<http1::Header>& headers,
                              http1::Framing upstream_framing, uint64_t content_length, bool& chunked_out) {
    request_.response_started(status);
    std::string& out = thread_.head_text();
    http1::write_response_head(out, status, reason, headers);
    chunked_out = false;
    switch (upstream_framing) {
    case http1::Framing::Length:
        out.append("Content-Length: ");
        out.append(std::to_string(content_length));
        out.append("\r\n");
        break;
    case http1::Framing::Chunked:
    case http1::Framing::UntilClose:
        if (request_.head.version_minor == 1) {
            out.append("Transfer-Encoding: chunked\r\n");
            chunked_out = true;
        } else {
            keep_alive_ = false;  // an HTTP/1.0 client learns the end from the close
        }
        break;
    case http1::Framing::None: break;
    }
    if (!keep_alive_) out.append("Connection: close\r\n");
    out.append("\r\n");
    evbuffer_add(transport_->output(), out.data(), out.size());
    // A response of known length leaves the head to be reused by the next request.
    if (upstream_framing != http1::Framing::Length) request_.release_head();
}

void ClientH1::interim_response(int status, std::string_view reason) {
    if (request_.head.version_minor < 1) return;
    std::string out;
    http1::write_response_head(out, status, reason, {});
    out.append("\r\n");
    evbuffer_add(transport_->output(), out.data(), out.size());
}

evbuffer* ClientH1::response_sink() { return transport_->output(); }

void ClientH1::response_data() {}

bool ClientH1::response_sink_full() {
    if (transport_->output_length() <= kOutputHighWater) return false;
    exchange_paused_ = true;
    transport_->set_watermark(EV_WRITE, kOutputLowWater, 0);
    return true;
}

void ClientH1::response_done() {
    request_.response_done();
    finish_request();
}

void ClientH1::exchange_failed(Failure failure, const char* why, bool response_started) {
    request_.exchange_failed(failure, why, response_started);
}

}  // namespace stepflow
