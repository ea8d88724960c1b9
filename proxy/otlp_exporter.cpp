#include "proxy/otlp_exporter.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "core/http1.h"
#include "core/log.h"
#include "core/text.h"
#include "proxy/metrics.h"
#include "proxy/otlp_wire.h"
#include "proxy/session_seal.h"
#include "proxy/span.h"

namespace stepflow {
namespace {

using Clock = std::chrono::steady_clock;
constexpr const char* kGrpcPath = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
constexpr int kMaxAttempts = 5;  // per batch, the first included
constexpr auto kFirstBackoff = std::chrono::milliseconds(500);
constexpr auto kMaxBackoff = std::chrono::seconds(16);
constexpr auto kMaxRetryAfter = std::chrono::seconds(30);  // a longer Retry-After is cut to this

// Set by shutdown(): every wait of the exporter ends by then, whatever the export timeout says.
std::atomic<int64_t> g_stop_at{INT64_MAX};

Clock::time_point stop_at() { return Clock::time_point(Clock::duration(g_stop_at.load())); }

// A blocking client connection with deadlines; the exporter thread is its only user.
class Connection {
public:
    ~Connection() { close(); }

    bool open(const OtlpTarget& t, bool h2, Clock::time_point deadline, std::string& error) {
        close();
        addrinfo hints{}, *res = nullptr;
        hints.ai_socktype = SOCK_STREAM;
        std::string port = std::to_string(t.port);
        int rc = getaddrinfo(t.host.c_str(), port.c_str(), &hints, &res);
        if (rc != 0) {
            error = std::string("cannot resolve ") + t.host + ": " + gai_strerror(rc);
            return false;
        }
        for (addrinfo* ai = res; ai && fd_ < 0; ai = ai->ai_next) {
            int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
            if (fd < 0) continue;
            if (::connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
                error = std::string("connect: ") + std::strerror(errno);
                ::close(fd);
                continue;
            }
            fd_ = fd;
            if (!wait(POLLOUT, deadline)) {
                error = "connect timed out";
                close();
                continue;
            }
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err != 0) {
                error = std::string("connect: ") + std::strerror(err);
                close();
            }
        }
        freeaddrinfo(res);
        if (fd_ < 0) return false;
        int one = 1;
        setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (t.tls && !handshake(t, h2, deadline, error)) {
            close();
            return false;
        }
        return true;
    }

    bool is_open() const { return fd_ >= 0; }

    void close() {
        if (ssl_) SSL_free(ssl_);
        ssl_ = nullptr;
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }

    bool write_all(const char* p, size_t n, Clock::time_point deadline, std::string& error) {
        while (n > 0) {
            ssize_t w;
            if (ssl_) {
                int r = SSL_write(ssl_, p, int(std::min<size_t>(n, 1 << 30)));
                if (r <= 0) {
                    if (!ssl_retry(r, deadline, error)) return false;
                    continue;
                }
                w = r;
            } else {
                w = ::send(fd_, p, n, MSG_NOSIGNAL);
                if (w < 0) {
                    if (errno == EINTR) continue;
                    if (errno != EAGAIN) { error = std::string("send: ") + std::strerror(errno); return false; }
                    if (!wait(POLLOUT, deadline)) { error = "send timed out"; return false; }
                    continue;
                }
            }
            p += w;
            n -= size_t(w);
        }
        return true;
    }

    // Bytes read (> 0), 0 at the peer's end of stream, -1 on an error or at the deadline.
    ssize_t read_some(char* buf, size_t n, Clock::time_point deadline, std::string& error) {
        for (;;) {
            if (ssl_) {
                int r = SSL_read(ssl_, buf, int(n));
                if (r > 0) return r;
                if (SSL_get_error(ssl_, r) == SSL_ERROR_ZERO_RETURN) return 0;
                if (!ssl_retry(r, deadline, error)) return -1;
                continue;
            }
            ssize_t r = ::recv(fd_, buf, n, 0);
            if (r >= 0) return r;
            if (errno == EINTR) continue;
            if (errno != EAGAIN) { error = std::string("recv: ") + std::strerror(errno); return -1; }
            if (!wait(POLLIN, deadline)) { error = "no answer before the export timeout"; return -1; }
        }
    }

private:
    bool wait(short events, Clock::time_point deadline) {
        deadline = std::min(deadline, stop_at());
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
            if (left <= 0) return false;
            pollfd p{fd_, events, 0};
            int r = ::poll(&p, 1, int(std::min<int64_t>(left, 100)));  // short slices: shutdown may move the deadline
            if (r > 0) return true;
            if (r < 0 && errno != EINTR) return false;
            deadline = std::min(deadline, stop_at());
        }
    }

    bool ssl_retry(int r, Clock::time_point deadline, std::string& error) {
        int e = SSL_get_error(ssl_, r);
        if (e == SSL_ERROR_WANT_READ) {
            if (wait(POLLIN, deadline)) return true;
            error = "TLS read timed out";
            return false;
        }
        if (e == SSL_ERROR_WANT_WRITE) {
            if (wait(POLLOUT, deadline)) return true;
            error = "TLS write timed out";
            return false;
        }
        unsigned long code = ERR_get_error();
        char buf[256];
        ERR_error_string_n(code, buf, sizeof buf);
        error = std::string("TLS: ") + (code ? buf : "connection closed");
        ERR_clear_error();
        return false;
    }

    static SSL_CTX* context(const std::string& ca_file) {
        static SSL_CTX* ctx = [&] {
            SSL_CTX* c = SSL_CTX_new(TLS_client_method());
            SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
            SSL_CTX_set_verify(c, SSL_VERIFY_PEER, nullptr);
            if (ca_file.empty()) SSL_CTX_set_default_verify_paths(c);  // the system CA bundle
            else SSL_CTX_load_verify_locations(c, ca_file.c_str(), nullptr);
            return c;
        }();
        return ctx;
    }

    bool handshake(const OtlpTarget& t, bool h2, Clock::time_point deadline, std::string& error) {
        ssl_ = SSL_new(context(t.ca_file));
        SSL_set_fd(ssl_, fd_);
        // SSL_set_tlsext_host_name is a macro with a C cast: call what it expands to.
        SSL_ctrl(ssl_, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, const_cast<char*>(t.host.c_str()));
        SSL_set1_host(ssl_, t.host.c_str());
        static const unsigned char h2_alpn[] = {2, 'h', '2'};
        static const unsigned char h1_alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
        if (h2) SSL_set_alpn_protos(ssl_, h2_alpn, sizeof h2_alpn);
        else SSL_set_alpn_protos(ssl_, h1_alpn, sizeof h1_alpn);
        for (;;) {
            int r = SSL_connect(ssl_);
            if (r == 1) return true;
            if (!ssl_retry(r, deadline, error)) return false;
        }
    }

    int fd_ = -1;
    SSL* ssl_ = nullptr;
};

struct Result {
    bool ok = false;
    bool retryable = true;
    std::string error;
    std::chrono::seconds retry_after{0};  // what the collector asked for (Retry-After, RetryInfo)
    std::string body;                     // the response message, up to kMaxResponseBody
};
constexpr size_t kMaxResponseBody = 64 * 1024;  // a partial success with its message fits

// One gRPC unary call at a time on a kept HTTP/2 session (nghttp2 in memory mode: it frames,
// the connection above moves the bytes).
class GrpcChannel {
public:
    ~GrpcChannel() { reset(); }

    Result call(const OtlpTarget& t, std::string_view message, Clock::time_point deadline) {
        Result result;
        if (!session_ && !open(t, deadline, result.error)) return result;
        // The gRPC message prefix (not compressed, big-endian length) and the message are read out
        // in place by on_read_body: the batch is not copied into a frame buffer of its own.
        uint32_t len = uint32_t(message.size());
        prefix_[0] = 0;
        for (int i = 0; i < 4; ++i) prefix_[1 + i] = char((len >> (24 - 8 * i)) & 0xff);
        message_ = message;
        sent_ = 0;
        closed_ = false;
        http_status_ = 0;
        grpc_status_ = -1;
        grpc_message_.clear();
        grpc_details_.clear();
        response_.clear();
        std::string authority = t.host + ":" + std::to_string(t.port);
        std::vector<nghttp2_nv> nv;
        auto add = [&](const std::string& n, const std::string& v) {
            nv.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(n.data())),
                          reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), n.size(), v.size(),
                          NGHTTP2_NV_FLAG_NONE});
        };
        static const std::string method = ":method", post = "POST", scheme = ":scheme", path = ":path",
                                 auth = ":authority", ct = "content-type", grpc = "application/grpc", te = "te",
                                 trailers = "trailers", path_value = kGrpcPath, https = "https", http = "http";
        add(method, post);
        add(scheme, t.tls ? https : http);
        add(path, path_value);
        add(auth, authority);
        add(ct, grpc);
        add(te, trailers);
        for (auto& [k, v] : t.headers) add(k, v);
        nghttp2_data_provider provider{};
        provider.read_callback = on_read_body;
        stream_id_ = nghttp2_submit_request(session_, nullptr, nv.data(), nv.size(), &provider, this);
        if (stream_id_ < 0) {
            result.error = nghttp2_strerror(stream_id_);
            reset();
            return result;
        }
        if (!pump(deadline, result.error)) {
            reset();
            return result;
        }
        if (grpc_status_ == 0) {
            result.ok = true;
            // One length-prefixed message, not compressed (we offered no grpc-accept-encoding).
            if (response_.size() >= 5 && response_[0] == 0) result.body = response_.substr(5);
            return result;
        }
        if (grpc_status_ < 0) {
            result.error = "no grpc-status (HTTP " + std::to_string(http_status_) + ")";
            return result;
        }
        result.error = "grpc-status " + std::to_string(grpc_status_) +
                       (grpc_message_.empty() ? "" : ": " + percent_decode(grpc_message_).substr(0, 512));
        // UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, OUT_OF_RANGE,
        // DATA_LOSS may pass (the OTLP specification's retryable codes); others will not.
        static constexpr int retryable[] = {1, 4, 8, 10, 11, 14, 15};
        result.retryable = std::find(std::begin(retryable), std::end(retryable), grpc_status_) != std::end(retryable);
        if (!grpc_details_.empty()) result.retry_after = otlp_exporter::grpc_retry_delay(grpc_details_);
        return result;
    }

    void reset() {
        if (session_) nghttp2_session_del(session_);
        session_ = nullptr;
        conn_.close();
    }

private:
    bool open(const OtlpTarget& t, Clock::time_point deadline, std::string& error) {
        if (!conn_.open(t, true, deadline, error)) return false;
        nghttp2_session_callbacks* cb;
        nghttp2_session_callbacks_new(&cb);
        nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
        nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
        nghttp2_session_client_new(&session_, cb, this);
        nghttp2_session_callbacks_del(cb);
        nghttp2_submit_settings(session_, NGHTTP2_FLAG_NONE, nullptr, 0);
        return true;
    }

    bool pump(Clock::time_point deadline, std::string& error) {
        char buf[16384];
        for (;;) {
            // Every frame nghttp2 can send now (the headers and DATA up to the collector's window)
            // goes out in one write rather than one per frame: a batch is many 16 KiB frames.
            out_.clear();
            for (;;) {
                const uint8_t* data;
                ssize_t n = nghttp2_session_mem_send(session_, &data);
                if (n < 0) { error = nghttp2_strerror(int(n)); return false; }
                if (n == 0) break;
                out_.append(reinterpret_cast<const char*>(data), size_t(n));
            }
            if (!out_.empty() && !conn_.write_all(out_.data(), out_.size(), deadline, error)) return false;
            if (closed_) return true;
            if (!nghttp2_session_want_read(session_) && !nghttp2_session_want_write(session_)) {
                error = "the collector closed the HTTP/2 session";
                return false;
            }
            ssize_t n = conn_.read_some(buf, sizeof buf, deadline, error);
            if (n == 0) { error = "the collector closed the connection"; return false; }
            if (n < 0) return false;
            ssize_t used = nghttp2_session_mem_recv(session_, reinterpret_cast<const uint8_t*>(buf), size_t(n));
            if (used < 0) { error = nghttp2_strerror(int(used)); return false; }
        }
    }

    static ssize_t on_read_body(nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags,
                                nghttp2_data_source*, void* user) {
        auto* self = static_cast<GrpcChannel*>(user);
        size_t total = sizeof self->prefix_ + self->message_.size();
        size_t n = std::min(length, total - self->sent_);
        for (size_t done = 0; done < n;) {
            size_t at = self->sent_ + done;
            size_t piece = at < sizeof self->prefix_ ? std::min(n - done, sizeof self->prefix_ - at) : n - done;
            const char* from = at < sizeof self->prefix_ ? self->prefix_ + at
                                                         : self->message_.data() + (at - sizeof self->prefix_);
            std::memcpy(buf + done, from, piece);
            done += piece;
        }
        self->sent_ += n;
        if (self->sent_ == total) *flags |= NGHTTP2_DATA_FLAG_EOF;
        return ssize_t(n);
    }

    static int on_header(nghttp2_session*, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
                         const uint8_t* value, size_t valuelen, uint8_t, void* user) {
        auto* self = static_cast<GrpcChannel*>(user);
        if (frame->hd.stream_id != self->stream_id_) return 0;
        std::string_view n(reinterpret_cast<const char*>(name), namelen), v(reinterpret_cast<const char*>(value), valuelen);
        if (n == ":status") self->http_status_ = std::atoi(std::string(v).c_str());
        else if (n == "grpc-status") self->grpc_status_ = std::atoi(std::string(v).c_str());
        else if (n == "grpc-message") self->grpc_message_.assign(v);
        else if (n == "grpc-status-details-bin") self->grpc_details_.assign(v);
        return 0;
    }

    static int on_data(nghttp2_session*, uint8_t, int32_t stream_id, const uint8_t* data, size_t len, void* user) {
        auto* self = static_cast<GrpcChannel*>(user);
        if (stream_id == self->stream_id_ && self->response_.size() < kMaxResponseBody)
            self->response_.append(reinterpret_cast<const char*>(data), std::min(len, kMaxResponseBody - self->response_.size()));
        return 0;
    }

    static int on_stream_close(nghttp2_session*, int32_t stream_id, uint32_t, void* user) {
        auto* self = static_cast<GrpcChannel*>(user);
        if (stream_id == self->stream_id_) self->closed_ = true;
        return 0;
    }

    Connection conn_;
    nghttp2_session* session_ = nullptr;
    std::string out_;  // frames gathered for one write
    char prefix_[5] = {};
    std::string_view message_;  // the caller's, for the call's duration
    size_t sent_ = 0;
    int32_t stream_id_ = -1;
    bool closed_ = false;
    int http_status_ = 0, grpc_status_ = -1;
    std::string grpc_message_;
    std::string grpc_details_;  // grpc-status-details-bin (base64)
    std::string response_;  // the response's DATA: the message with its 5-byte prefix
};

// OTLP/HTTP: POST <path> with application/x-protobuf on a kept HTTP/1.1 connection.
class HttpChannel {
public:
    Result call(const OtlpTarget& t, std::string_view message, Clock::time_point deadline) {
        Result result;
        if (!conn_.is_open() && !conn_.open(t, false, deadline, result.error)) return result;
        std::string req = "POST " + t.path + " HTTP/1.1\r\nHost: " + t.host + ":" + std::to_string(t.port) +
                          "\r\nContent-Type: application/x-protobuf\r\nContent-Length: " + std::to_string(message.size()) +
                          "\r\n";
        for (auto& [k, v] : t.headers) req += k + ": " + v + "\r\n";
        req += "\r\n";
        if (!conn_.write_all(req.data(), req.size(), deadline, result.error) ||
            !conn_.write_all(message.data(), message.size(), deadline, result.error)) {
            conn_.close();
            return result;
        }
        http1::Head head;
        if (!read_answer(head, result.body, deadline, result.error)) {
            conn_.close();
            return result;
        }
        if (head.status >= 200 && head.status < 300) {
            result.ok = true;
            return result;
        }
        result.error = "HTTP " + std::to_string(head.status);
        if (http1::iequals(head.get("content-type"), "application/x-protobuf")) {
            std::string why = otlp_exporter::status_message(result.body);
            if (!why.empty()) result.error += ": " + why.substr(0, 512);
        }
        result.body.clear();
        result.retryable = head.status == 429 || head.status == 502 || head.status == 503 || head.status == 504;
        result.retry_after = otlp_exporter::retry_after(head.get("retry-after"));
        return result;
    }

    void reset() { conn_.close(); }

private:
    // The collector's answer, read with the data path's HTTP/1.1 parser and body pump
    // (core/http1.h): interim 1xx heads are read past (RFC 9110 §15.2), the body is read to its
    // end (by length, in chunks or until close), its first kMaxResponseBody bytes kept, and the
    // connection closed unless it can carry the next export. False when no final head came.
    bool read_answer(http1::Head& head, std::string& body, Clock::time_point deadline, std::string& error) {
        std::unique_ptr<evbuffer, void (*)(evbuffer*)> in(evbuffer_new(), evbuffer_free), out(evbuffer_new(), evbuffer_free);
        auto read_more = [&] {
            char tmp[8192];
            ssize_t n = conn_.read_some(tmp, sizeof tmp, deadline, error);
            if (n > 0) evbuffer_add(in.get(), tmp, size_t(n));
            return n > 0;
        };
        size_t scan = 0;
        do {
            size_t n;
            while ((n = http1::find_head_end(in.get(), 64 * 1024, scan)) == 0) {
                if (!read_more()) {
                    if (error.empty()) error = "the collector closed the connection";
                    return false;
                }
            }
            if (n == SIZE_MAX) {
                error = "the collector's answer head is over 64 KiB";
                return false;
            }
            head.clear();
            head.raw.resize(n);
            evbuffer_remove(in.get(), head.raw.data(), n);
            scan = 0;
            if (auto e = http1::parse_response(head, false)) {
                error = std::string("the collector's answer: ") + e.reason;
                return false;
            }
        } while (head.status < 200);
        http1::BodyPump pump;
        pump.start(head.framing, head.content_length, false);
        bool keep = head.keep_alive;
        for (;;) {
            auto status = pump.pump(in.get(), out.get());
            size_t have = evbuffer_get_length(out.get());
            size_t take = std::min(have, kMaxResponseBody - std::min(kMaxResponseBody, body.size()));
            if (take) {
                size_t at = body.size();
                body.resize(at + take);
                evbuffer_remove(out.get(), body.data() + at, take);
            }
            evbuffer_drain(out.get(), evbuffer_get_length(out.get()));
            if (status == http1::BodyPump::Status::Done) break;
            if (status == http1::BodyPump::Status::Error || !read_more()) {
                keep = false;  // an answer cut short or ended by the close (UntilClose): kept as it is
                break;
            }
        }
        if (!keep || evbuffer_get_length(in.get()) > 0) conn_.close();  // bytes past the answer: start afresh
        return true;
    }

    Connection conn_;
};

// OTLP's ExportTraceServiceRequest written straight from the spans, in protobuf's wire format
// (the field numbers of proxy/otlp.proto, in field order, proto3 defaults left out: the bytes
// protobuf's own serializer writes, which tests/unit/test_trace.cpp checks). Building the
// generated messages first cost more than everything else tracing does per request
// (docs/architecture.md, "Tracing").

class Exporter {
public:
    explicit Exporter(const ExporterSettings& s) : settings_(s) {
        trace::Queue::configure(s.max_queue_size, s.max_export_batch_size);
        thread_ = std::thread([this] { run(); });
    }

    void shutdown(std::chrono::milliseconds limit) {
        g_stop_at.store((Clock::now() + limit).time_since_epoch().count());
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
        }
        backoff_.notify_all();
        trace::Queue::wake();
        if (thread_.joinable()) thread_.join();
    }

private:
    void run() {
        std::string batch;  // span records (proxy/span.h)
        std::string message;
        for (;;) {
            bool stopping = is_stopping();
            batch.clear();
            size_t spans = trace::Queue::take(batch, settings_.max_export_batch_size,
                                              stopping ? 0 : uint64_t(settings_.schedule_delay.count()));
            if (!spans) {
                if (stopping) return;
                continue;
            }
            std::string_view request = otlp_exporter::encode(settings_.resource, batch, message);
            send(request, spans);
        }
    }

    bool is_stopping() {
        std::lock_guard lock(mutex_);
        return stopping_;
    }

    Result attempt(std::string_view message) {
        auto deadline = Clock::now() + settings_.export_timeout;
        if (settings_.target.protocol == OtlpTarget::Protocol::Grpc) return grpc_.call(settings_.target, message, deadline);
        return http_.call(settings_.target, message, deadline);
    }

    void send(std::string_view message, size_t spans) {
        auto& m = Metrics::get();
        auto backoff = std::chrono::duration_cast<std::chrono::milliseconds>(kFirstBackoff);
        for (int n = 1;; ++n) {
            Result r = attempt(message);
            if (r.ok) {
                int64_t rejected = rejected_spans(r.body, spans);
                m.trace_spans_exported.Increment(double(int64_t(spans) - rejected));
                if (failing_) log::info("trace export resumed", {{"endpoint", endpoint()}});
                failing_ = false;
                return;
            }
            m.trace_export_failures.Increment();
            if (!failing_) log::warn("trace export failed", {{"endpoint", endpoint()}, {"reason", r.error}, {"spans", spans}});
            failing_ = true;
            if (!r.retryable || n >= kMaxAttempts || Clock::now() >= stop_at()) break;
            // Exponential backoff with jitter, or longer when the collector asks for it (within
            // kMaxRetryAfter), cut short by shutdown.
            std::uniform_int_distribution<int64_t> jitter(0, backoff.count() / 2);
            auto wait = std::max<std::chrono::milliseconds>(backoff + std::chrono::milliseconds(jitter(rng_)),
                                                            std::min<std::chrono::seconds>(r.retry_after, kMaxRetryAfter));
            std::unique_lock lock(mutex_);
            auto until = std::min(Clock::now() + wait, stop_at());
            backoff_.wait_until(lock, until, [this] { return stopping_ && Clock::now() >= stop_at(); });
            if (Clock::now() >= stop_at()) break;
            backoff = std::min<std::chrono::milliseconds>(backoff * 2, kMaxBackoff);
        }
        m.trace_spans_export_dropped.Increment(double(spans));
    }

    // OTLP's partial success: the export went through, but the collector refused some of its
    // spans. It must not be sent again; the refused spans are counted as dropped and said in the
    // log at most once a minute. Returns how many of `spans` were refused.
    int64_t rejected_spans(std::string_view body, size_t spans) {
        otlp_exporter::PartialSuccess p;
        if (body.empty() || !otlp_exporter::decode_response(body, p) || p.rejected_spans <= 0) return 0;
        int64_t rejected = std::min<int64_t>(p.rejected_spans, int64_t(spans));
        Metrics::get().trace_spans_rejected.Increment(double(rejected));
        rejected_since_said_ += rejected;
        auto now = Clock::now();
        if (now >= next_rejection_log_) {
            log::warn("collector rejected spans", {{"endpoint", endpoint()}, {"rejected", rejected_since_said_},
                                                    {"reason", p.error_message}});
            rejected_since_said_ = 0;
            next_rejection_log_ = now + std::chrono::minutes(1);
        }
        return rejected;
    }

    std::string endpoint() const {
        const auto& t = settings_.target;
        return std::string(t.tls ? "https://" : "http://") + t.host + ":" + std::to_string(t.port) +
               (t.protocol == OtlpTarget::Protocol::HttpProtobuf ? t.path : "");
    }

    ExporterSettings settings_;
    GrpcChannel grpc_;
    HttpChannel http_;
    std::mutex mutex_;
    std::condition_variable backoff_;
    bool stopping_ = false;
    bool failing_ = false;
    int64_t rejected_since_said_ = 0;
    Clock::time_point next_rejection_log_{};
    std::minstd_rand rng_{std::random_device{}()};
    std::thread thread_;
};

Exporter* g_exporter = nullptr;

}  // namespace

namespace otlp_exporter {

std::string_view encode(const std::vector<std::pair<std::string, std::string>>& resource, std::string_view records,
                        std::string& out) {
    using namespace otlp_wire;
    // The spans are OTLP Span bytes already (proxy/span.h). They are copied in one pass, after
    // room left in front for the wrappers, whose lengths are known only once the spans are in:
    // the records are read once, as they are copied.
    static const std::string_view scope_name = "stepflow-lb", scope_version = STEPFLOW_LB_VERSION;
    size_t scope_size = bytes_field_size(1, scope_name.size()) + bytes_field_size(2, scope_version.size());
    size_t resource_size = 0;
    for (auto& [k, v] : resource) resource_size += string_key_value_size(1, k, v);
    // The resource is written when it has attributes (as protobuf did: mutable_resource() per attribute).
    size_t resource_part = resource.empty() ? 0 : bytes_field_size(1, resource_size);
    size_t front = (1 + 5) + resource_part + (1 + 5) + bytes_field_size(1, scope_size);
    // A record's prefix (16 bytes) is longer than a span's tag and length (6 at most).
    out.resize(front + records.size());
    char* spans = out.data() + front;
    char* p = spans;
    for (const char* r = records.data(); r < records.data() + records.size(); r += trace::record_size(r))
        put_bytes(p, 2, trace::span_bytes(r));  // ScopeSpans.spans
    size_t scope_spans_size = bytes_field_size(1, scope_size) + size_t(p - spans);
    size_t resource_spans_size = resource_part + bytes_field_size(2, scope_spans_size);
    size_t head = tag_size(1) + varint_size(resource_spans_size) + resource_part + tag_size(2) +
                  varint_size(scope_spans_size) + bytes_field_size(1, scope_size);
    char* start = spans - head;
    char* q = start;
    put_tag(q, 1, kLen);  // ExportTraceServiceRequest.resource_spans
    put_varint(q, resource_spans_size);
    if (!resource.empty()) {
        put_tag(q, 1, kLen);  // ResourceSpans.resource
        put_varint(q, resource_size);
        for (auto& [k, v] : resource) put_string_key_value(q, 1, k, v);
    }
    put_tag(q, 2, kLen);  // ResourceSpans.scope_spans
    put_varint(q, scope_spans_size);
    put_tag(q, 1, kLen);  // ScopeSpans.scope
    put_varint(q, scope_size);
    put_bytes(q, 1, scope_name);
    put_bytes(q, 2, scope_version);
    if (q != spans) std::abort();  // a size function and its writer disagree
    return {start, size_t(p - start)};
}

namespace {
// A varint at p (advanced), false past `end` or beyond 10 bytes.
bool read_varint(const char*& p, const char* end, uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        auto b = static_cast<uint8_t>(*p++);
        v |= uint64_t(b & 0x7f) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

// Calls field(number, wire type, varint value, bytes) for each field of a message; false when
// the bytes are not a message (a truncated field, an unknown or group wire type).
template <class Fn>
bool for_each_field(std::string_view bytes, Fn field) {
    const char* p = bytes.data();
    const char* end = p + bytes.size();
    while (p < end) {
        uint64_t key, v = 0;
        if (!read_varint(p, end, key)) return false;
        auto type = uint8_t(key & 7);
        std::string_view b;
        if (type == otlp_wire::kVarint) {
            if (!read_varint(p, end, v)) return false;
        } else if (type == otlp_wire::kFixed64 || type == otlp_wire::kFixed32) {
            size_t n = type == otlp_wire::kFixed64 ? 8 : 4;
            if (size_t(end - p) < n) return false;
            p += n;
        } else if (type == otlp_wire::kLen) {
            if (!read_varint(p, end, v) || v > uint64_t(end - p)) return false;
            b = std::string_view(p, size_t(v));
            p += v;
        } else {
            return false;
        }
        field(key >> 3, type, v, b);
    }
    return true;
}
}  // namespace

bool decode_response(std::string_view bytes, PartialSuccess& out) {
    out = {};
    bool ok = true;
    bool read = for_each_field(bytes, [&](uint64_t number, uint8_t type, uint64_t, std::string_view b) {
        if (number != 1 || type != otlp_wire::kLen) return;  // partial_success
        ok &= for_each_field(b, [&](uint64_t n, uint8_t t, uint64_t v, std::string_view s) {
            if (n == 1 && t == otlp_wire::kVarint) out.rejected_spans = int64_t(v);
            else if (n == 2 && t == otlp_wire::kLen) out.error_message.assign(s);
        });
    });
    return read && ok;
}

std::chrono::seconds grpc_retry_delay(std::string_view b64) {
    std::string bytes;  // base64, padded or not (gRPC binary metadata)
    if (!base64url_decode(b64, bytes)) return std::chrono::seconds(0);
    // Status.details (3) holds Any messages: type_url (1), value (2); RetryInfo.retry_delay (1)
    // is a Duration: seconds (1), nanos (2).
    int64_t seconds = 0, nanos = 0;
    for_each_field(bytes, [&](uint64_t n, uint8_t t, uint64_t, std::string_view any) {
        if (n != 3 || t != otlp_wire::kLen) return;
        std::string_view type, value;
        for_each_field(any, [&](uint64_t an, uint8_t at, uint64_t, std::string_view b) {
            if (at != otlp_wire::kLen) return;
            if (an == 1) type = b;
            else if (an == 2) value = b;
        });
        constexpr std::string_view kRetryInfo = "/google.rpc.RetryInfo";
        if (type.size() < kRetryInfo.size() || type.substr(type.size() - kRetryInfo.size()) != kRetryInfo) return;
        for_each_field(value, [&](uint64_t rn, uint8_t rt, uint64_t, std::string_view duration) {
            if (rn != 1 || rt != otlp_wire::kLen) return;
            for_each_field(duration, [&](uint64_t dn, uint8_t dt, uint64_t v, std::string_view) {
                if (dt != otlp_wire::kVarint) return;
                if (dn == 1) seconds = int64_t(v);
                else if (dn == 2) nanos = int64_t(v);
            });
        });
    });
    if (seconds < 0 || seconds > 86400 || nanos < 0) return std::chrono::seconds(0);
    return std::chrono::seconds(seconds + (nanos > 0 ? 1 : 0));
}

std::string status_message(std::string_view bytes) {
    std::string message;  // google.rpc.Status: code 1, message 2, details 3
    bool ok = for_each_field(bytes, [&](uint64_t n, uint8_t t, uint64_t, std::string_view b) {
        if (n == 2 && t == otlp_wire::kLen) message.assign(b);
    });
    return ok ? message : std::string();
}

namespace {

// An HTTP-date as seconds since the epoch, -1 when the value is not one. RFC 9110 §5.6.7: the
// IMF-fixdate form, and the obsolete RFC 850 and asctime forms a recipient must read too.
// strptime's day and month names are the C locale's, which is what HTTP uses (the balancer
// never calls setlocale).
int64_t parse_http_date(std::string_view value) {
    static constexpr const char* kForms[] = {"%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT",
                                             "%a %b %e %H:%M:%S %Y"};
    if (value.size() > 64) return -1;
    std::string text(value);  // strptime reads a terminated string
    for (const char* form : kForms) {
        std::tm tm{};
        const char* end = strptime(text.c_str(), form, &tm);
        if (end && *end == '\0') return int64_t(timegm(&tm));
    }
    return -1;
}

}  // namespace

std::chrono::seconds retry_after(std::string_view value, std::chrono::system_clock::time_point now) {
    value = trim(value);
    if (value.empty()) return std::chrono::seconds(0);
    if (value.find_first_not_of("0123456789") == std::string_view::npos) {
        if (value.size() > 9) return std::chrono::seconds(0);
        int64_t s = 0;
        for (char c : value) s = s * 10 + (c - '0');
        return std::chrono::seconds(s);
    }
    int64_t at = parse_http_date(value);
    if (at < 0) return std::chrono::seconds(0);
    int64_t wait = at - int64_t(std::chrono::system_clock::to_time_t(now));
    return std::chrono::seconds(std::max<int64_t>(0, wait));  // a date gone by: no wait asked
}

void start(const ExporterSettings& settings) {
    if (!g_exporter) g_exporter = new Exporter(settings);
}

void shutdown(std::chrono::milliseconds limit) {
    if (!g_exporter) return;
    g_exporter->shutdown(limit);
    delete g_exporter;
    g_exporter = nullptr;
}

}  // namespace otlp_exporter
}  // namespace stepflow
