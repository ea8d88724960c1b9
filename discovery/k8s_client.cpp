#include "discovery/k8s_client.h"

#include <cstring>
#include <fstream>
#include <sstream>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/config.h"
#include "core/net.h"

namespace stepflow {
namespace {

constexpr size_t kMaxHead = 64 * 1024;
constexpr size_t kMaxWholeBody = 64 * 1024 * 1024;  // a list page of many slices stays far below
constexpr size_t kMaxErrorBody = 64 * 1024;

bool is_ip_literal(const std::string& host) {
    sockaddr_storage ss;
    socklen_t len;
    return numeric_sockaddr(HostPort{host, 1}, ss, len);
}

// Retry-After in delta-seconds (the form the API server sends); dates are not worth parsing here.
std::chrono::milliseconds parse_retry_after(std::string_view v) {
    if (v.empty() || v.size() > 6) return std::chrono::milliseconds(0);
    int64_t s = 0;
    for (char c : v) {
        if (c < '0' || c > '9') return std::chrono::milliseconds(0);
        s = s * 10 + (c - '0');
    }
    return std::chrono::milliseconds(s * 1000);
}

}  // namespace

std::string ApiServer::url() const {
    return std::string(tls ? "https://" : "http://") + format_host_port(host, port) + base_path;
}

bool parse_api_server(const std::string& url, ApiServer& out, std::string& error) {
    std::string rest;
    if (url.rfind("https://", 0) == 0) {
        out.tls = true;
        rest = url.substr(8);
    } else if (url.rfind("http://", 0) == 0) {
        out.tls = false;
        rest = url.substr(7);
    } else {
        error = "'" + url + "' is not an http:// or https:// URL";
        return false;
    }
    size_t slash = rest.find('/');
    std::string authority = rest.substr(0, slash);
    out.base_path = slash == std::string::npos ? "" : rest.substr(slash);
    while (!out.base_path.empty() && out.base_path.back() == '/') out.base_path.pop_back();
    HostPort hp;
    bool has_port = !authority.empty() && authority.back() != ']' && authority.find(':') != std::string::npos &&
                    (authority.front() == '[' || authority.find(':') == authority.rfind(':'));
    if (has_port) {
        if (!parse_host_port(authority, hp) || hp.port == 0) {
            error = "'" + url + "': bad host:port";
            return false;
        }
    } else {
        hp.host = authority;
        if (hp.host.size() > 2 && hp.host.front() == '[' && hp.host.back() == ']') hp.host = hp.host.substr(1, hp.host.size() - 2);
        hp.port = out.tls ? 443 : 80;
    }
    if (hp.host.empty()) {
        error = "'" + url + "' names no host";
        return false;
    }
    out.host = hp.host;
    out.port = hp.port;
    if (numeric_sockaddr(hp, out.addr, out.addr_len)) return true;
    std::vector<sockaddr_storage> addrs;
    std::string why;
    if (!resolve_all(hp, addrs, why) || addrs.empty()) {
        error = "cannot resolve API server '" + hp.host + "': " + why;
        return false;
    }
    out.addr = addrs.front();
    out.addr_len = addrs.front().ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
    return true;
}

SSL_CTX* make_api_tls_context(const std::string& ca_file, std::string& error) {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        error = "cannot create a TLS context";
        return nullptr;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    if (SSL_CTX_load_verify_locations(ctx, ca_file.c_str(), nullptr) != 1) {
        char buf[256];
        ERR_error_string_n(ERR_get_error(), buf, sizeof buf);
        ERR_clear_error();
        error = "cannot load the API server CA from '" + ca_file + "': " + buf;
        SSL_CTX_free(ctx);
        return nullptr;
    }
    return ctx;
}

TokenSource::TokenSource(std::string path, std::chrono::seconds max_age) : path_(std::move(path)), max_age_(max_age) {}

const std::string& TokenSource::get() {
    auto t = now();
    if (!stale_ && t - read_at_ < max_age_) return token_;
    stale_ = false;
    read_at_ = t;
    ++reads_;
    if (path_.empty()) return token_;
    std::ifstream in(path_);
    if (!in) return token_;  // keep the last token if the file is briefly missing mid-rotation
    std::stringstream ss;
    ss << in.rdbuf();
    std::string text = ss.str();
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.pop_back();
    if (!text.empty()) token_ = std::move(text);
    return token_;
}

std::string url_encode(std::string_view s) {
    static const char* hex = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : s) {
        if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
            out += static_cast<char>(c);
        } else {
            out += '%';
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    return out;
}

ApiCall::ApiCall(event_base* base, const ApiServer& server, SSL_CTX* tls, std::string path, const std::string& token,
                 Mode mode, std::chrono::milliseconds head_timeout, std::chrono::milliseconds idle_timeout,
                 Callbacks callbacks, ApiConnections* pool)
    : base_(base), server_(server), tls_(tls), pool_(pool), mode_(mode), callbacks_(std::move(callbacks)),
      idle_timeout_(idle_timeout) {
    payload_ = evbuffer_new();
    head_deadline_ = evtimer_new(base, on_head_deadline, this);
    request_ = "GET " + server.base_path + path + " HTTP/1.1\r\nHost: " + format_host_port(server.host, server.port) +
               "\r\nUser-Agent: stepflow-lb\r\nAccept: application/json\r\n";
    if (!token.empty()) request_ += "Authorization: Bearer " + token + "\r\n";
    // Without a pool nothing would reuse the connection: say so, and the server closes it.
    if (!pool_) request_ += "Connection: close\r\n";
    request_ += "\r\n";
    timeval tv = to_timeval(head_timeout);
    evtimer_add(head_deadline_, &tv);
    open(true);
}

void ApiCall::open(bool reuse) {
    bev_ = reuse && pool_ ? pool_->take() : nullptr;
    reused_ = bev_ != nullptr;
    if (reused_) {
        pool_->note_reused();
    } else if (server_.tls) {
        SSL* ssl = SSL_new(tls_);
        // Check the certificate names the host we dialled (an IP SAN for an IP, a DNS SAN else).
        if (is_ip_literal(server_.host)) {
            X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), server_.host.c_str());
        } else {
            SSL_set1_host(ssl, server_.host.c_str());
            // SNI; SSL_set_tlsext_host_name is a macro with a C cast, so call what it expands to.
            SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, const_cast<char*>(server_.host.c_str()));
        }
        bev_ = bufferevent_openssl_socket_new(base_, -1, ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
        // The API server may close a finished response without a TLS close_notify.
        bufferevent_openssl_set_allow_dirty_shutdown(bev_, 1);
    } else {
        bev_ = bufferevent_socket_new(base_, -1, BEV_OPT_CLOSE_ON_FREE);
    }
    bufferevent_setcb(bev_, on_read, nullptr, on_event, this);
    bufferevent_write(bev_, request_.data(), request_.size());
    bufferevent_enable(bev_, EV_READ | EV_WRITE);
    if (reused_) return;
    if (pool_) pool_->note_opened();
    if (bufferevent_socket_connect(bev_, reinterpret_cast<const sockaddr*>(&server_.addr),
                                   static_cast<int>(server_.addr_len)) != 0) {
        // Reported from the loop, never from the constructor: the owner is not ready for it yet.
        outcome_.error = "connect failed";
        evtimer_del(head_deadline_);
        timeval now{0, 0};
        evtimer_add(head_deadline_, &now);
    }
}

// A kept-alive connection the server closed while it sat idle (or just as we wrote to it) shows
// up as an end or error before any byte of the answer: the request was not served, so dial anew.
// Only once per call, and only for a reused connection: a fresh one failing is a real failure.
bool ApiCall::redial_if_stale(short what) {
    if (!reused_ || got_bytes_ || !(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))) return false;
    bufferevent_free(bev_);
    bev_ = nullptr;
    open(false);
    return true;
}

ApiCall::~ApiCall() {
    *alive_ = false;
    if (bev_) bufferevent_free(bev_);
    if (head_deadline_) event_free(head_deadline_);
    if (payload_) evbuffer_free(payload_);
}

void ApiCall::on_head_deadline(int, short, void* arg) {
    auto* self = static_cast<ApiCall*>(arg);
    Outcome o;
    o.error = self->outcome_.error.empty() ? "no response head in time" : self->outcome_.error;
    self->finish(std::move(o));
}

void ApiCall::on_read(bufferevent*, void* arg) { static_cast<ApiCall*>(arg)->read_input(false); }

std::string ApiCall::transport_error(short what) const {
    if (what & BEV_EVENT_TIMEOUT) return "read timed out";
    unsigned long ssl_err = bev_ ? bufferevent_get_openssl_error(bev_) : 0;
    if (ssl_err) {
        char buf[256];
        ERR_error_string_n(ssl_err, buf, sizeof buf);
        return std::string("TLS: ") + buf;
    }
    int err = EVUTIL_SOCKET_ERROR();
    if (what & BEV_EVENT_EOF) return "connection closed";
    return err ? std::string(evutil_socket_error_to_string(err)) : std::string("connection failed");
}

void ApiCall::on_event(bufferevent*, short what, void* arg) {
    auto* self = static_cast<ApiCall*>(arg);
    if (what & BEV_EVENT_CONNECTED) return;
    if (self->redial_if_stale(what)) return;
    if (what & BEV_EVENT_EOF) {
        self->read_input(true);
        return;
    }
    Outcome o = std::move(self->outcome_);
    o.error = self->transport_error(what);
    self->finish(std::move(o));
}

void ApiCall::read_input(bool eof) {
    if (finished_) return;
    evbuffer* in = bufferevent_get_input(bev_);
    if (evbuffer_get_length(in) > 0) got_bytes_ = true;
    if (!head_done_) {
        size_t n = http1::find_head_end(in, kMaxHead, scan_from_);
        if (n == SIZE_MAX) return finish({0, "response head too large", "", {}, false});
        if (n == 0) {
            if (eof) finish({0, "connection closed before a response", "", {}, false});
            return;
        }
        head_ = http1::Head{};
        head_.raw.resize(n);
        evbuffer_remove(in, head_.raw.data(), n);
        if (auto err = http1::parse_response(head_, false)) return finish({0, err.reason, "", {}, false});
        if (head_.status < 200) {  // interim response: wait for the real one
            scan_from_ = 0;
            return read_input(eof);
        }
        head_done_ = true;
        evtimer_del(head_deadline_);
        timeval idle = to_timeval(idle_timeout_);
        bufferevent_set_timeouts(bev_, &idle, nullptr);
        outcome_.status = head_.status;
        outcome_.retry_after = parse_retry_after(head_.get("retry-after"));
        pump_.start(head_.framing, head_.content_length, false);
        if (mode_ == Mode::Lines && head_.status == 200 && callbacks_.on_open) {
            std::weak_ptr<bool> alive = alive_;
            callbacks_.on_open();
            if (alive.expired()) return;
        }
    }
    auto status = pump_.pump(in, payload_);
    if (status == http1::BodyPump::Status::Error) {
        outcome_.error = pump_.error();
        return finish(std::move(outcome_));
    }
    if (status == http1::BodyPump::Status::More && eof) {
        if (pump_.until_close()) {
            pump_.finish_on_close(payload_);
            status = http1::BodyPump::Status::Done;
        } else {
            outcome_.error = "connection closed mid-body";
        }
    }
    bool streaming = mode_ == Mode::Lines && outcome_.status == 200;
    if (streaming) {
        std::weak_ptr<bool> alive = alive_;
        bool stopped = false;
        bool ok = lines_.feed(payload_, [&](std::string_view line) {
            callbacks_.on_line(line);
            stopped = alive.expired() || finished_;
            return !stopped;
        });
        if (alive.expired() || finished_) return;
        if (!ok) {
            outcome_.error = "watch event line too long";
            return finish(std::move(outcome_));
        }
    } else {
        size_t limit = mode_ == Mode::Whole && outcome_.status == 200 ? kMaxWholeBody : kMaxErrorBody;
        if (evbuffer_get_length(payload_) > limit) {
            outcome_.error = "response body too large";
            return finish(std::move(outcome_));
        }
    }
    if (status == http1::BodyPump::Status::Done) {
        outcome_.clean = true;
        // Reusable when framed by length or chunks, not marked for closing, and nothing more
        // arrived behind it (bytes beyond the response would mean the stream is out of step).
        reusable_ = !eof && !pump_.until_close() && head_.keep_alive && evbuffer_get_length(in) == 0;
        if (!streaming) {
            size_t len = evbuffer_get_length(payload_);
            outcome_.body.assign(reinterpret_cast<const char*>(evbuffer_pullup(payload_, -1)), len);
        }
        return finish(std::move(outcome_));
    }
    if (eof) return finish(std::move(outcome_));  // truncated: error was set above
}

void ApiCall::finish(Outcome outcome) {
    if (finished_) return;
    finished_ = true;
    evtimer_del(head_deadline_);
    if (bev_) {
        if (reusable_ && pool_ && outcome.error.empty()) {
            bufferevent_disable(bev_, EV_WRITE);
            pool_->give(bev_);
        } else {
            bufferevent_free(bev_);
        }
        bev_ = nullptr;
    }
    callbacks_.on_done(std::move(outcome));  // last: it may destroy this call
}

}  // namespace stepflow
