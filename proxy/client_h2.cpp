#include "proxy/client_h2.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <new>
#include <optional>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "core/config.h"
#include "core/log.h"
#include "proxy/block_cache.h"
#include "proxy/conn.h"
#include "proxy/request.h"
#include "proxy/loop_thread.h"

namespace stepflow {
namespace {

constexpr size_t kStreamBufferHigh = 64 * 1024;   // response bytes waiting per stream
constexpr size_t kStreamBufferLow = 16 * 1024;
constexpr size_t kConnectionOutputHigh = 128 * 1024;
constexpr int32_t kConnectionWindow = 4 * 1024 * 1024;
constexpr size_t kCopyPayloadUpTo = 2 * 1024;      // DATA payloads copied; larger ones move chains
constexpr size_t kSpareBuffers = 16;               // empty stream buffers kept per connection

// The concurrent-stream limit nghttp2 itself enforces (see the ClientH2 constructor): high
// enough that streams refused but not yet reset never reach it in normal use.
uint32_t library_stream_limit(uint32_t configured) { return configured * 2 + 100; }

// Rewrites SETTINGS_MAX_CONCURRENT_STREAMS in our first SETTINGS frame from the library's
// limit to the configured one.
void advertise_stream_limit(std::string& frame, uint32_t configured) {
    if (frame.size() < 9 || frame[3] != NGHTTP2_SETTINGS) return;
    auto* p = reinterpret_cast<unsigned char*>(frame.data());
    size_t len = (size_t(p[0]) << 16) | (size_t(p[1]) << 8) | p[2];
    for (size_t i = 9; i + 6 <= 9 + len && i + 6 <= frame.size(); i += 6) {
        if (((p[i] << 8) | p[i + 1]) != NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS) continue;
        p[i + 2] = uint8_t(configured >> 24);
        p[i + 3] = uint8_t(configured >> 16);
        p[i + 4] = uint8_t(configured >> 8);
        p[i + 5] = uint8_t(configured);
    }
}

// Lower-cases A-Z in place, eight bytes at a time; `size` is a multiple of 8.
void lower_ascii(char* p, size_t size) {
    constexpr uint64_t k7f = 0x7f7f7f7f7f7f7f7f, k80 = 0x8080808080808080;
    for (size_t i = 0; i < size; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        uint64_t low7 = w & k7f;
        uint64_t above_z = low7 + 0x2525252525252525;    // high bit set where the byte > 'Z'
        uint64_t from_a = low7 + 0x3f3f3f3f3f3f3f3f;     // high bit set where the byte >= 'A'
        uint64_t upper = (from_a & ~above_z) & ~w & k80;  // ASCII 'A'..'Z'
        w |= upper >> 2;                                  // 0x80 >> 2 == 0x20
        std::memcpy(p + i, &w, 8);
    }
}

// NO_COPY_NAME only for names that outlive the session (literals).
nghttp2_nv make_nv(std::string_view name, std::string_view value, uint8_t flags = NGHTTP2_NV_FLAG_NONE) {
    return {reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
            reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(), value.size(), flags};
}

// Fields HTTP/2 forbids (RFC 9113 §8.2.2); the exchange already dropped the hop-by-hop ones.
bool connection_specific(http1::Field field) {
    switch (field) {
    case http1::Field::Connection:
    case http1::Field::KeepAlive:
    case http1::Field::ProxyConnection:
    case http1::Field::TransferEncoding:
    case http1::Field::Upgrade:
    case http1::Field::TE: return true;
    default: return false;
    }
}

nghttp2_mem block_cache_mem = {
    nullptr,
    [](size_t size, void*) { return block_alloc(size); },
    [](void* p, void*) { block_free(p); },
    [](size_t n, size_t size, void*) -> void* {
        if (size != 0 && n > SIZE_MAX / size) return nullptr;
        void* p = block_alloc(n * size);
        if (p) std::memset(p, 0, n * size);
        return p;
    },
    [](void* p, size_t size, void*) { return block_realloc(p, size); },
};

}  // namespace

// One stream: HTTP/2 framing and flow control around the stream's Request (proxy/request.h),
// which routes, answers locally and keeps the record.
class ClientH2::Stream final : public RequestFraming {
public:
    Stream(ClientH2& conn, int32_t id)
        : conn_(conn), id_(id), resp_buf_(conn.take_buffer()), request_(*this, conn.thread_, conn.client_ip_, conn.tls_) {
        request_.record.begin();  // a new object: nothing else of Request::begin to reset
    }
    static void* operator new(size_t size) {
        if (void* p = block_alloc(size)) return p;
        throw std::bad_alloc();
    }
    static void operator delete(void* p) { block_free(p); }

    ~Stream() override {
        request_.drop_exchange();
        if (req_buf_) conn_.give_buffer(req_buf_);
        conn_.give_buffer(resp_buf_);
    }

    // --- request side (called from nghttp2 callbacks) ---
    // Each field is kept in the head's raw as [name length][value length][name][value] (lengths as
    // uint32_t): one growing buffer instead of a string per name and value. begin() points the
    // head's views into it once the block is complete, so no view is moved by a reallocation.
    void header(std::string_view name, std::string_view value) {
        header_bytes_ += name.size() + value.size() + 32;
        if (header_bytes_ > conn_.thread_.config().h2_max_header_list_size ||
            ++header_count_ > conn_.thread_.config().max_headers) {
            header_overflow_ = true;
            return;
        }
        std::string& raw = request_.head.raw;
        if (raw.capacity() < 256) raw.reserve(256);
        uint32_t lengths[2] = {uint32_t(name.size()), uint32_t(value.size())};
        size_t at = raw.size();
        raw.resize(at + sizeof lengths + name.size() + value.size());
        char* p = raw.data() + at;
        std::memcpy(p, lengths, sizeof lengths);
        std::memcpy(p + sizeof lengths, name.data(), name.size());
        std::memcpy(p + sizeof lengths + name.size(), value.data(), value.size());
        if (name.empty() || name[0] != ':') ++field_count_;
        if (name == "cookie") {
            ++cookie_fields_;
            cookie_bytes_ += value.size();
        }
    }

    // The field header() stored at `at` in raw; false past the last.
    static bool next_field(std::string_view raw, size_t& at, std::string_view& name, std::string_view& value) {
        if (at >= raw.size()) return false;
        uint32_t lengths[2];
        std::memcpy(lengths, raw.data() + at, sizeof lengths);
        name = raw.substr(at + sizeof lengths, lengths[0]);
        value = raw.substr(at + sizeof lengths + lengths[0], lengths[1]);
        at += sizeof lengths + lengths[0] + lengths[1];
        return true;
    }

    void begin(bool end_stream) {
        http1::Head& head = request_.head;
        began_ = true;
        request_ended_ = end_stream;
        // HTTP/2 gives what an HTTP/1.1 head would hold as separate fields: build the head from
        // them and apply the HTTP/1.1 checks (http1::check_request). nghttp2 has already
        // enforced HTTP/2's own rules (lower-case names, pseudo-header order, no
        // connection-specific fields), so what is left is what both versions share.
        head.headers.reserve(field_count_ + 1);
        if (cookie_fields_ > 1) head.raw.reserve(head.raw.size() + cookie_bytes_ + 2 * cookie_fields_);
        size_t cookie_at = SIZE_MAX;  // where the joined cookie field goes
        std::string_view authority, host;
        std::string_view raw = head.raw;
        std::string_view name, value;
        for (size_t at = 0; next_field(raw, at, name, value);) {
            if (!name.empty() && name[0] == ':') {  // pseudo-header fields come first (nghttp2 checks)
                if (name == ":method") head.method = value;
                else if (name == ":path") head.target = value;
                else if (name == ":authority" && !value.empty()) {
                    authority = value;
                    head.headers.push_back({"host", value, http1::Field::Host});
                }
                continue;
            }
            if (cookie_fields_ > 1 && name == "cookie") {
                if (cookie_at == SIZE_MAX) {
                    cookie_at = head.headers.size();
                    head.headers.push_back({"cookie", {}, http1::Field::Other});
                }
                continue;
            }
            http1::Field field = http1::classify(name);
            if (field == http1::Field::Host && !authority.empty()) {
                host = value;
                continue;  // :authority wins (RFC 9113 §8.3.1)
            }
            head.headers.push_back({name, value, field});
        }
        if (cookie_at != SIZE_MAX) {
            // RFC 9113 §8.2.3: crumbs sent as separate fields are one Cookie field to HTTP/1.1,
            // joined with "; ". Appended to raw within the capacity reserved above, so no view moves.
            std::string& joined = head.raw;
            size_t start = joined.size(), cookies = 0;
            for (size_t at = 0; next_field(raw, at, name, value);) {
                if (name != "cookie" || value.empty()) continue;
                if (cookies++ > 0) joined.append("; ");
                joined.append(value);
            }
            head.headers[cookie_at].value = std::string_view(joined).substr(start);
        }
        if (head.target.empty()) head.target = "*";
        if (header_overflow_) return reject(431, "request header list too large");
        // RFC 9113 §8.3.1: a Host naming another authority than :authority makes the request
        // malformed; the worker would otherwise see one and the routing the other.
        if (!host.empty() && !http1::iequals(host, authority)) return reject(400, "host differs from :authority");
        const Config& cfg = conn_.thread_.config();
        if (auto err = http1::check_request(head, {cfg.h2_max_header_list_size * 2, cfg.max_headers + 1}))
            return reject(err.status, err.reason);
        bool has_length = std::any_of(head.headers.begin(), head.headers.end(), [](const http1::Header& h) {
            return h.field == http1::Field::ContentLength;
        });
        if (!request_ended_ && head.framing == http1::Framing::None && !has_length) {
            head.framing = http1::Framing::Chunked;  // length unknown: chunked to the worker
            chunked_up_ = true;
        }
        if (request_ended_) head.framing = http1::Framing::None;
        watch_body();
        log::Scope ids(request_.start_trace());
        if (request_.route()) return;
        local_mode_ = true;
        if (request_ended_) return answer_locally();
        // Reading the body only for its id: --local-body-timeout in all, not between bytes.
        request_.await_body_for_id();
    }

    void data(const uint8_t* bytes, size_t len) {
        request_.record.bytes_in += len;
        // The connection window reopens at once: what a stream holds is bounded by its own
        // window (--h2-initial-window-size, times --h2-max-concurrent-streams per connection), so
        // uploads queued or back-pressured never close the window a pinned callback answer on
        // the same connection needs.
        nghttp2_session_consume_connection(conn_.session_, len);
        if (!local_mode_) watch_body();
        Exchange* exchange = request_.exchange();
        if (exchange && !answered_) {
            // Nothing queued ahead and the worker's connection takes it: straight there rather
            // than through req_buf_ (one copy instead of two).
            evbuffer* sink = exchange->request_sink();
            if (sink && !body_forwarded_ && !(req_buf_ && evbuffer_get_length(req_buf_) > 0) &&
                !exchange->request_sink_full()) {
                forward(sink, len, [&] {
                    if (ReplayBuffer* replay = exchange->replay_copy()) replay->keep(bytes, len);
                    evbuffer_add(sink, bytes, len);
                });
                return;
            }
            evbuffer_add(req_buf(), bytes, len);
            unconsumed_ += len;
            pump_request_body();
            watch_body();
            return;
        }
        // Answered already, or collecting a body only to read its JSON-RPC id.
        nghttp2_session_consume_stream(conn_.session_, id_, len);
        if (local_mode_ && !answered_) {
            evbuffer_add(req_buf(), bytes, len);
            if (evbuffer_get_length(req_buf_) > kLocalBodyLimit) {
                evbuffer_drain(req_buf_, evbuffer_get_length(req_buf_));  // answered without the id
                answer_locally();
            }
        }
    }

    void end_of_request() {
        request_ended_ = true;
        request_.stop_awaiting_body();
        if (local_mode_ && !answered_) answer_locally();
        else pump_request_body();
    }

    // The client closed or reset the stream, or it ended normally; `error_code` is that of the
    // RST_STREAM either side sent (PROTOCOL_ERROR: nghttp2 found the request malformed).
    void closed(uint32_t error_code) {
        request_.stop_awaiting_body();
        bool malformed = error_code == NGHTTP2_PROTOCOL_ERROR;
        // A reset stream cancels the worker's request.
        request_.cancel(malformed ? 400 : 499);  // the status when it ended before any answer
        unconsumed_ = 0;  // its bytes left the connection window on arrival
        if (!began_) {
            // The head never completed (an invalid field, or a reset during it): not a request,
            // so no access-log line or request metric; a malformed one counts as rejected.
            request_.skip_log();
            if (malformed) request_.note_rejected(400, "malformed HTTP/2 request (stream error)");
            return;
        }
        finish_log();
    }

    // --- response side ---
    // A small payload is copied into nghttp2's frame buffer. A larger one is not copied at all:
    // NO_COPY makes nghttp2 call on_send_data for the frame, which moves resp_buf_'s chains
    // behind the frame header. (Moving costs a chain allocation on each side and an iovec more
    // to write, more than copying a few hundred bytes.)
    ssize_t read_response(uint8_t* buf, size_t length, uint32_t* flags) {
        size_t have = evbuffer_get_length(resp_buf_);
        size_t n = std::min(length, have);
        if (n == have && response_done_) *flags |= NGHTTP2_DATA_FLAG_EOF;
        else if (n == 0) return NGHTTP2_ERR_DEFERRED;
        if (n > kCopyPayloadUpTo) *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
        else if (n > 0) evbuffer_remove(resp_buf_, buf, n);
        if (paused_ && have - n < kStreamBufferLow) {
            paused_ = false;
            resume_pending_ = true;  // resumed outside nghttp2's send loop
            conn_.resumes_pending_ = true;
            // This may run from the socket's write callback, not from on_deferred: without
            // scheduling a pass, nothing would ever resume the worker and the stream would stall.
            conn_.schedule_send();
        }
        return static_cast<ssize_t>(n);
    }

    void run_pending_resume() {
        if (!resume_pending_) return;
        resume_pending_ = false;
        if (Exchange* exchange = request_.exchange()) exchange->resume_response();
    }

    // --- Downstream ---
    void start_response(int status, std::string_view, const std::vector<http1::Header>& headers,
                        http1::Framing framing, uint64_t content_length, bool& chunked_out) override {
        chunked_out = false;
        request_.response_started(status);
        // nghttp2 copies names and values when the response is submitted, so the connection's
        // scratch vectors serve every response: no allocation once they have grown.
        std::vector<nghttp2_nv>& nva = conn_.nva_;
        std::string& names = conn_.names_;
        nva.clear();
        names.clear();
        size_t names_size = 0;
        for (const auto& h : headers) names_size += h.name.size();
        names.resize((names_size + 7) & ~size_t(7));  // before any view into it is taken
        char* name_out = names.data();
        char status_text[16], length_text[24];
        auto status_end = std::to_chars(status_text, status_text + sizeof status_text, status).ptr;
        nva.push_back(make_nv(":status", {status_text, size_t(status_end - status_text)}, NGHTTP2_NV_FLAG_NO_COPY_NAME));
        for (const auto& h : headers) {
            if (connection_specific(h.field)) continue;
            std::memcpy(name_out, h.name.data(), h.name.size());
            nva.push_back(make_nv({name_out, h.name.size()}, h.value));
            name_out += h.name.size();
        }
        lower_ascii(names.data(), names.size());  // HTTP/2 names are lower case
        if (framing == http1::Framing::Length) {
            auto end = std::to_chars(length_text, length_text + sizeof length_text, content_length).ptr;
            nva.push_back(make_nv("content-length", {length_text, size_t(end - length_text)}, NGHTTP2_NV_FLAG_NO_COPY_NAME));
        }
        submit(nva.data(), nva.size(), framing != http1::Framing::None);
        // As on HTTP/1.1, a streamed response keeps only the method and target of the request.
        if (framing != http1::Framing::Length) request_.release_head();
    }

    evbuffer* response_sink() override { return resp_buf_; }

    void interim_response(int, std::string_view) override {}  // 1xx are not relayed over HTTP/2

    void response_data() override {
        nghttp2_session_resume_data(conn_.session_, id_);
        conn_.schedule_send();
    }

    bool response_sink_full() override {
        if (evbuffer_get_length(resp_buf_) <= kStreamBufferHigh) return false;
        paused_ = true;
        return true;
    }

    void response_done() override {
        response_done_ = true;
        request_.response_done();
        nghttp2_session_resume_data(conn_.session_, id_);
        conn_.schedule_send();
        finish_log();
    }

    void exchange_failed(Failure failure, const char* why, bool response_started) override {
        request_.exchange_failed(failure, why, response_started);
    }

    // --- RequestFraming ---
    void send_answer(const LocalAnswer& a) override { answer(a); }

    void break_response(bool cancelled) override {
        nghttp2_submit_rst_stream(conn_.session_, NGHTTP2_FLAG_NONE, id_, cancelled ? NGHTTP2_CANCEL : NGHTTP2_INTERNAL_ERROR);
        conn_.schedule_send();
        finish_log();
    }

    // The body never left the stream: read it for its id, as for a routing miss.
    bool read_body_for_id() override {
        local_mode_ = true;
        if (unconsumed_ > 0) {
            nghttp2_session_consume_stream(conn_.session_, id_, unconsumed_);
            conn_.schedule_send();
            unconsumed_ = 0;
        }
        if (request_ended_) {
            answer_locally();
            return true;
        }
        // As for a routing miss: --local-body-timeout in all, so a client that stops sending
        // cannot hold the stream.
        request_.await_body_for_id();
        return true;
    }

    void body_timed_out() override {
        if (request_ended_ || answered_ || !open_) return;
        if (local_mode_) {
            evbuffer_drain(req_buf(), evbuffer_get_length(req_buf_));
            answer_locally();  // without the id
            return;
        }
        log::Scope ids(request_.record.trace.correlation());
        log::debug("request body timeout", {{"client", conn_.client_ip_}, {"stream", int64_t(id_)}});
        if (!request_.exchange()) return;
        request_.give_up_on_body();
    }

    void request_sink_ready() override { pump_request_body(); }

private:
    void pump_request_body() {
        Exchange* exchange = request_.exchange();
        if (!exchange || body_forwarded_) return;
        evbuffer* sink = exchange->request_sink();
        if (!sink || exchange->request_sink_full()) return;  // unconsumed bytes hold the client's window
        size_t n = req_buf_ ? evbuffer_get_length(req_buf_) : 0;
        if (n > 0) {
            forward(sink, n, [&] {
                if (ReplayBuffer* replay = exchange->replay_copy()) replay->payload(req_buf_, n);
                evbuffer_remove_buffer(req_buf_, sink, n);
            });
            unconsumed_ -= n;
            watch_body();
        }
        if (request_ended_) {
            if (chunked_up_) evbuffer_add(sink, "0\r\n\r\n", 5);
            body_forwarded_ = true;
            conn_.thread_.series().body_received(request_.record.bytes_in);
            exchange->request_body_done();
        }
    }

    // Writes `n` body bytes to the worker (chunk-framed when its length is unknown) and opens
    // the client's window by as much.
    template <class Write>
    void forward(evbuffer* sink, size_t n, Write write) {
        if (chunked_up_) {
            char line[24];
            int len = std::snprintf(line, sizeof line, "%zx\r\n", n);
            evbuffer_add(sink, line, size_t(len));
        }
        write();
        if (chunked_up_) evbuffer_add(sink, "\r\n", 2);
        nghttp2_session_consume_stream(conn_.session_, id_, n);
        conn_.schedule_send();  // window updates
    }

    // --request-body-timeout runs while the client owes body bytes and nothing it sent waits for
    // the worker: with bytes held (unconsumed_), its window is closing because of the worker,
    // and --upstream-request-timeout is the bound that applies.
    void watch_body() {
        if (request_ended_ || answered_ || unconsumed_ > 0) request_.stop_awaiting_body();
        else request_.await_body();
    }

    evbuffer* req_buf() {
        if (!req_buf_) req_buf_ = conn_.take_buffer();
        return req_buf_;
    }

    void reject(int status, const char* why) { request_.reject(status, why); }

    void answer_locally() {
        std::string id = jsonrpc_id_of(req_buf());
        evbuffer_drain(req_buf_, evbuffer_get_length(req_buf_));
        request_.answer_locally(id);
    }

    void answer(const LocalAnswer& a) {
        answered_ = true;
        request_.record.status = a.status;
        request_.record.bytes_out = a.body.size();
        evbuffer_add(resp_buf_, a.body.data(), a.body.size());
        response_done_ = true;
        std::string status_text = std::to_string(a.status), length_text = std::to_string(a.body.size());
        std::string retry = std::to_string(conn_.thread_.config().retry_after_seconds);
        std::vector<nghttp2_nv> nva = {make_nv(":status", status_text), make_nv("content-type", "application/json"),
                                       make_nv("content-length", length_text)};
        if (a.retry_after) nva.push_back(make_nv("retry-after", retry));
        submit(nva.data(), nva.size(), true);
        finish_log();
    }

    void submit(const nghttp2_nv* nva, size_t count, bool has_body) {
        nghttp2_data_provider provider;
        provider.source.ptr = this;
        provider.read_callback = [](nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags,
                                    nghttp2_data_source* source, void*) -> ssize_t {
            return static_cast<Stream*>(source->ptr)->read_response(buf, length, flags);
        };
        nghttp2_submit_response(conn_.session_, id_, nva, count, has_body ? &provider : nullptr);
        conn_.schedule_send();
    }

    void finish_log() { request_.log_access_once(); }

    ClientH2& conn_;
    int32_t id_;
    size_t header_bytes_ = 0;
    int header_count_ = 0;
    size_t field_count_ = 0;  // regular (not pseudo-header) fields kept
    size_t cookie_fields_ = 0, cookie_bytes_ = 0;  // joined into one field when several (RFC 9113 §8.2.3)
    bool header_overflow_ = false;
    evbuffer* req_buf_ = nullptr;  // request body waiting for the worker (made when first needed)
    evbuffer* resp_buf_;
    size_t unconsumed_ = 0;
    bool request_ended_ = false, body_forwarded_ = false, chunked_up_ = false;
    bool began_ = false, local_mode_ = false, answered_ = false;
    bool response_done_ = false, paused_ = false, resume_pending_ = false;
    Request request_;  // the exchange lives in it (no allocation of its own) until the stream is freed
    Stream* prev_ = nullptr;  // ClientH2's list of open streams, then of closed ones (next_ only)
    Stream* next_ = nullptr;
    bool open_ = true;

    friend class ClientH2;
};

ClientH2::ClientH2(LoopThread& thread, Conn* transport, std::string client_ip, bool tls)
    : thread_(thread), transport_(transport), client_ip_(std::move(client_ip)), tls_(tls) {
    const Config& cfg = thread.config();
    nghttp2_session_callbacks* callbacks;
    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, on_begin_headers);
    nghttp2_session_callbacks_set_on_begin_frame_callback(callbacks, on_begin_frame);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_send_callback(callbacks, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);
    nghttp2_session_callbacks_set_send_data_callback(callbacks, on_send_data);
    nghttp2_option* option;
    nghttp2_option_new(&option);
    // Windows open only as the worker takes request bytes (see Stream::pump_request_body).
    nghttp2_option_set_no_auto_window_update(option, 1);
    // HTTP messaging checks stay on (no nghttp2_option_set_no_http_messaging): field names and
    // values are validated there and not again in http1::check_request.
    // The library's defences: rapid reset (CVE-2023-44487) and CONTINUATION floods.
    nghttp2_option_set_stream_reset_rate_limit(option, 1000, 33);
    nghttp2_option_set_max_continuations(option, 8);
    nghttp2_session_server_new3(&session_, callbacks, this, option, &block_cache_mem);
    nghttp2_option_del(option);
    nghttp2_session_callbacks_del(callbacks);

    // nghttp2 treats a stream beyond the *acknowledged* SETTINGS_MAX_CONCURRENT_STREAMS as a
    // connection error (GOAWAY PROTOCOL_ERROR), which would take every other stream of the
    // connection down with it; RFC 9113 §5.1.2 asks for a stream error. So the library is given
    // a higher limit, the client is told the configured one (send() rewrites the value in this
    // first SETTINGS frame), and on_begin_headers refuses the excess with REFUSED_STREAM.
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, library_stream_limit(cfg.h2_max_concurrent_streams)},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, cfg.h2_initial_window_size},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, cfg.h2_max_header_list_size},
    };
    nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, settings, sizeof settings / sizeof settings[0]);
    nghttp2_session_set_local_window_size(session_, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);

    deferred_ = event_new(thread.base(), -1, 0, on_deferred, this);
    transport_->set_callbacks(on_read, on_write, on_event, this);
    transport_->set_watermark(EV_WRITE, kConnectionOutputHigh / 4, 0);
    transport_->enable(EV_READ | EV_WRITE);
    // A client that takes none of what waits for it is dropped (on_event: BEV_EVENT_TIMEOUT).
    transport_->set_send_timeout(cfg.client_send_timeout);
    arm_idle();
    receive();  // the preface (and maybe more) is already buffered
}

ClientH2::~ClientH2() {
    while (streams_) {
        Stream* s = streams_;
        streams_ = s->next_;
        delete s;
    }
    free_closed();
    for (evbuffer* b : spare_buffers_) evbuffer_free(b);
    nghttp2_session_del(session_);
    event_free(deferred_);
    delete transport_;
}

void ClientH2::arm_idle() { idle_.arm(thread_.timers(), thread_.config().keepalive_idle_timeout); }

evbuffer* ClientH2::take_buffer() {
    if (spare_buffers_.empty()) return evbuffer_new();
    evbuffer* b = spare_buffers_.back();
    spare_buffers_.pop_back();
    return b;
}

void ClientH2::give_buffer(evbuffer* b) {
    if (evbuffer_get_length(b) == 0 && spare_buffers_.size() < kSpareBuffers) spare_buffers_.push_back(b);
    else evbuffer_free(b);
}

void ClientH2::free_closed() {
    while (closed_) {
        Stream* s = closed_;
        closed_ = s->next_;
        delete s;
    }
}

void ClientH2::on_header_block_timeout(void* arg) {
    auto* self = static_cast<ClientH2*>(arg);
    if (self->destroying_) return;
    log::debug("HTTP/2 header block not completed in time", {{"client", self->client_ip_}});
    // Nothing else can arrive on this connection before the block ends: it is over.
    nghttp2_session_terminate_session(self->session_, NGHTTP2_PROTOCOL_ERROR);
    evbuffer_drain(self->transport_->input(), evbuffer_get_length(self->transport_->input()));
    self->transport_->disable(EV_READ);
    self->send();
    self->maybe_close();
}

void ClientH2::on_idle(void* arg) {
    auto* self = static_cast<ClientH2*>(arg);
    if (self->streams_) return;
    nghttp2_session_terminate_session(self->session_, NGHTTP2_NO_ERROR);
    self->send();
    self->maybe_close();
}

void ClientH2::on_read(Conn*, void* arg) { static_cast<ClientH2*>(arg)->receive(); }

void ClientH2::on_write(Conn*, void* arg) {
    auto* self = static_cast<ClientH2*>(arg);
    self->send();
    self->maybe_close();
}

void ClientH2::on_event(Conn*, short what, void* arg) {
    auto* self = static_cast<ClientH2*>(arg);
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) self->destroy();
}

void ClientH2::receive() {
    if (destroying_) return;
    evbuffer* in = transport_->input();
    while (size_t len = evbuffer_get_contiguous_space(in)) {
        const uint8_t* data = evbuffer_pullup(in, static_cast<ssize_t>(len));
        ssize_t rv = nghttp2_session_mem_recv(session_, data, len);
        if (rv < 0) {
            log::debug("HTTP/2 session error", {{"client", client_ip_}, {"reason", nghttp2_strerror(int(rv))}});
            if (rv == NGHTTP2_ERR_BAD_CLIENT_MAGIC) {  // not HTTP/2 at all: nothing to say
                destroy();
                return;
            }
            // A connection error: tell the client why with a GOAWAY (RFC 9113 §5.4.1) — the
            // library's fatal errors queue none — and close once it is written. Destroying at
            // once would drop the output buffer with the GOAWAY in it.
            bool abuse = rv == NGHTTP2_ERR_FLOODED || rv == NGHTTP2_ERR_TOO_MANY_CONTINUATIONS;
            nghttp2_session_terminate_session(session_, abuse ? NGHTTP2_ENHANCE_YOUR_CALM : NGHTTP2_PROTOCOL_ERROR);
            evbuffer_drain(in, evbuffer_get_length(in));
            transport_->disable(EV_READ);
            send();
            maybe_close();
            return;
        }
        evbuffer_drain(in, size_t(rv));
    }
    send();
    free_closed();
    maybe_close();
}

void ClientH2::schedule_send() {
    if (!destroying_) event_active(deferred_, 0, 0);
}

void ClientH2::on_deferred(int, short, void* arg) {
    auto* self = static_cast<ClientH2*>(arg);
    if (self->destroying_) {
        self->thread_.connection_closed(self);
        delete self;
        return;
    }
    if (self->resumes_pending_) {  // some stream went below its low-water mark (read_response)
        self->resumes_pending_ = false;
        for (Stream* s = self->streams_; s; s = s->next_) s->run_pending_resume();
    }
    self->send();
    self->free_closed();
    self->maybe_close();
}

void ClientH2::send() {
    if (destroying_) return;
    evbuffer* out = transport_->output();
    while (evbuffer_get_length(out) < kConnectionOutputHigh) {
        const uint8_t* data = nullptr;
        ssize_t n = nghttp2_session_mem_send(session_, &data);
        if (n < 0) {
            destroy();
            return;
        }
        if (n == 0) break;
        if (!settings_sent_) {
            settings_sent_ = true;  // a server's first frame is its SETTINGS (see the constructor)
            std::string frame(reinterpret_cast<const char*>(data), size_t(n));
            advertise_stream_limit(frame, thread_.config().h2_max_concurrent_streams);
            evbuffer_add(out, frame.data(), frame.size());
            continue;
        }
        evbuffer_add(out, data, size_t(n));
    }
}

void ClientH2::maybe_close() {
    if (destroying_) return;
    bool done = !nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_);
    if (draining_ && !streams_) done = true;
    if (done && transport_->output_length() == 0) destroy();
}

void ClientH2::destroy() {
    if (destroying_) return;
    destroying_ = true;
    transport_->disable(EV_READ | EV_WRITE);
    idle_.cancel();
    header_block_.cancel();
    event_active(deferred_, 0, 0);
}

void ClientH2::drain() {
    draining_ = true;
    nghttp2_submit_goaway(session_, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(session_),
                          NGHTTP2_NO_ERROR, nullptr, 0);
    send();
    maybe_close();
}

void ClientH2::close_now() {
    thread_.connection_closed(this);
    delete this;
}

void ClientH2::stream_closed(Stream* stream) {
    if (!stream->open_) return;
    stream->open_ = false;
    if (stream->prev_) stream->prev_->next_ = stream->next_;
    else streams_ = stream->next_;
    if (stream->next_) stream->next_->prev_ = stream->prev_;
    stream->prev_ = nullptr;
    stream->next_ = closed_;
    closed_ = stream;
    --stream_count_;
    if (!streams_) arm_idle();
}

int ClientH2::on_begin_headers(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    auto* self = static_cast<ClientH2*>(user);
    // A header block left open (HEADERS without END_HEADERS, then no CONTINUATION) blocks every
    // other frame of the connection: it must end within --request-header-timeout (on_frame_recv
    // stops the clock once the block is complete).
    if (!(frame->hd.flags & NGHTTP2_FLAG_END_HEADERS))
        self->header_block_.arm(self->thread_.timers(), self->thread_.config().request_header_timeout);
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    if (self->stream_count_ >= self->thread_.config().h2_max_concurrent_streams) {
        // No Stream object: the refused stream's fields and DATA are ignored.
        log::debug("HTTP/2 stream refused: too many concurrent streams",
                   {{"client", self->client_ip_}, {"stream", int64_t(frame->hd.stream_id)}});
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_REFUSED_STREAM);
        self->receiving_ = nullptr;
        return 0;
    }
    // Open streams are an intrusive list: no container node or hashing per stream.
    auto* stream = new Stream(*self, frame->hd.stream_id);
    nghttp2_session_set_stream_user_data(session, frame->hd.stream_id, stream);
    self->receiving_ = stream;
    stream->next_ = self->streams_;
    if (self->streams_) self->streams_->prev_ = stream;
    self->streams_ = stream;
    ++self->stream_count_;
    self->idle_.cancel();
    return 0;
}

// A new stream's id must exceed every id the client used before (RFC 9113 §5.1.1): opening
// stream 5 implicitly closes idle streams 1 and 3, and HEADERS on either afterwards is a
// connection error PROTOCOL_ERROR. nghttp2 cannot tell such an id from a stream that was
// opened and has closed (it forgets those) and ignores both. We remember the ids a client
// skipped (the first kMaxSkippedRanges gaps; clients normally count 1, 3, 5, ...) and fail the
// connection on HEADERS for one: receive() then sends GOAWAY(PROTOCOL_ERROR) and closes.
int ClientH2::on_begin_frame(nghttp2_session*, const nghttp2_frame_hd* hd, void* user) {
    auto* self = static_cast<ClientH2*>(user);
    if (hd->type != NGHTTP2_HEADERS || hd->stream_id % 2 == 0) return 0;  // even ids: nghttp2's check
    int32_t id = hd->stream_id;
    if (id > self->last_opened_) {
        if (id > self->last_opened_ + 2 && self->skipped_.size() < kMaxSkippedRanges)
            self->skipped_.push_back({self->last_opened_ + 2, id - 2});
        self->last_opened_ = id;
        return 0;
    }
    for (const auto& [low, high] : self->skipped_) {
        if (id < low || id > high) continue;
        log::debug("HTTP/2 stream id lower than one already opened",
                   {{"client", self->client_ip_}, {"stream", int64_t(id)}, {"last", int64_t(self->last_opened_)}});
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    return 0;
}

int ClientH2::on_header(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
                        const uint8_t* value, size_t valuelen, uint8_t, void* user) {
    if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;  // trailers: dropped
    // A request's header block follows its on_begin_headers with no other frame in between.
    Stream* stream = static_cast<ClientH2*>(user)->receiving_;
    if (stream)
        stream->header({reinterpret_cast<const char*>(name), namelen}, {reinterpret_cast<const char*>(value), valuelen});
    return 0;
}

int ClientH2::on_frame_recv(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    if (frame->hd.type == NGHTTP2_HEADERS) static_cast<ClientH2*>(user)->header_block_.cancel();
    auto* stream = static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (!stream) return 0;
    bool end_stream = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
    if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        stream->begin(end_stream);
    } else if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS) && end_stream) {
        stream->end_of_request();
    }
    return 0;
}

int ClientH2::on_data_chunk(nghttp2_session* session, uint8_t, int32_t stream_id, const uint8_t* data, size_t len,
                            void*) {
    auto* stream = static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, stream_id));
    if (!stream) {
        nghttp2_session_consume_connection(session, len);
        return 0;
    }
    stream->data(data, len);
    return 0;
}

// A DATA frame whose payload read_response left in the stream's buffer (NGHTTP2_DATA_FLAG_NO_COPY).
int ClientH2::on_send_data(nghttp2_session*, nghttp2_frame* frame, const uint8_t* framehd, size_t length,
                           nghttp2_data_source* source, void* user) {
    evbuffer* out = static_cast<ClientH2*>(user)->transport_->output();
    evbuffer_add(out, framehd, 9);
    // Padding is never chosen (no select_padding callback), but its layout is cheap to honour.
    size_t pad = frame->data.padlen;
    if (pad > 0) {
        uint8_t pad_length = uint8_t(pad - 1);
        evbuffer_add(out, &pad_length, 1);
    }
    evbuffer_remove_buffer(static_cast<Stream*>(source->ptr)->resp_buf_, out, length);  // chains move
    if (pad > 1) {
        static const uint8_t zeros[256] = {};
        evbuffer_add(out, zeros, pad - 1);
    }
    return 0;
}

// A response sent in full before the request ended (a local answer, or a worker that answered
// without reading the whole body): RST_STREAM(NO_ERROR) asks the client to stop sending the rest
// (RFC 9113 §8.1), after the response so that it is not lost. DATA already on its way is still
// counted in the connection's window: nghttp2 consumes what arrives for a closed stream, and a
// stream's bytes leave the connection window on arrival (Stream::data).
int ClientH2::on_frame_send(nghttp2_session* session, const nghttp2_frame* frame, void*) {
    if (frame->hd.type != NGHTTP2_DATA && frame->hd.type != NGHTTP2_HEADERS) return 0;
    if (!(frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) return 0;
    auto* stream = static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, frame->hd.stream_id));
    if (stream && !stream->request_ended_)
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
    return 0;
}

int ClientH2::on_stream_close(nghttp2_session* session, int32_t stream_id, uint32_t error_code, void* user) {
    auto* self = static_cast<ClientH2*>(user);
    auto* stream = static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, stream_id));
    if (!stream) return 0;
    stream->closed(error_code);
    self->stream_closed(stream);
    return 0;
}

}  // namespace stepflow
