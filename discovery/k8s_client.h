// A minimal Kubernetes API client on libevent: GETs over a kept-alive connection (see
// api_connections.h), over TLS (CA-verified, host-checked) or plain HTTP (as behind `kubectl proxy`), with a bearer token that is re-read
// from its file so rotated service-account tokens are picked up. Two kinds of call: a whole body
// (lists) and a line stream (watches), where each complete line is handed on as it arrives.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <sys/socket.h>

#include "core/http1.h"
#include "discovery/api_connections.h"
#include "discovery/k8s_line_splitter.h"

struct event_base;
struct event;
struct bufferevent;
struct evbuffer;
typedef struct ssl_ctx_st SSL_CTX;

namespace stepflow {

struct ApiServer {
    bool tls = true;
    std::string host;         // as written in the URL, without brackets
    uint16_t port = 443;
    std::string base_path;    // URL path prefix, without trailing '/'
    sockaddr_storage addr{};  // resolved once at start-up
    socklen_t addr_len = 0;
    std::string url() const;
};

// "https://host[:port][/prefix]" or "http://...". Names are resolved here, with the system
// resolver, which blocks: call it at start-up only.
bool parse_api_server(const std::string& url, ApiServer& out, std::string& error);

// Verifies the API server against `ca_file`. Null with `error` set when the file is unusable.
SSL_CTX* make_api_tls_context(const std::string& ca_file, std::string& error);

// The bearer token, re-read from its file when older than max_age and after invalidate() (a 401
// means it may have rotated). An empty path or a missing file means no token.
class TokenSource {
public:
    explicit TokenSource(std::string path, std::chrono::seconds max_age = std::chrono::seconds(60));
    const std::string& get();
    void invalidate() { stale_ = true; }
    // Test hook: reads happen at most once per max_age of this clock.
    std::function<std::chrono::steady_clock::time_point()> now = [] { return std::chrono::steady_clock::now(); };
    int reads() const { return reads_; }

private:
    std::string path_;
    std::chrono::seconds max_age_;
    std::string token_;
    std::chrono::steady_clock::time_point read_at_{};
    bool stale_ = true;
    int reads_ = 0;
};

// One GET. Exactly one on_done per call, always last; the call may be destroyed from inside any
// of its callbacks, and destroying it earlier cancels it without further callbacks (and closes
// its connection: a half-read response cannot be reused). With `pool`, the call starts on the
// pool's idle connection if there is one, dials again if that turns out closed before any
// answer, and parks its connection there after a cleanly framed response.
class ApiCall {
public:
    enum class Mode { Whole, Lines };
    struct Outcome {
        int status = 0;          // 0: no response head (connect, TLS or timeout failure)
        std::string error;       // transport trouble, empty when none
        std::string body;        // Whole mode, or the error body of a non-200 Lines call
        std::chrono::milliseconds retry_after{0};
        bool clean = false;      // the body ended as framed (a watch ended by the server)
    };
    struct Callbacks {
        std::function<void()> on_open;                  // Lines mode: a 200 head arrived
        std::function<void(std::string_view)> on_line;  // Lines mode: one complete line
        std::function<void(Outcome)> on_done;
    };

    ApiCall(event_base* base, const ApiServer& server, SSL_CTX* tls, std::string path, const std::string& token,
            Mode mode, std::chrono::milliseconds head_timeout, std::chrono::milliseconds idle_timeout,
            Callbacks callbacks, ApiConnections* pool = nullptr);
    ~ApiCall();
    ApiCall(const ApiCall&) = delete;
    ApiCall& operator=(const ApiCall&) = delete;

private:
    static void on_read(bufferevent*, void* arg);
    static void on_event(bufferevent*, short what, void* arg);
    static void on_head_deadline(int, short, void* arg);
    void open(bool reuse);
    bool redial_if_stale(short what);
    void read_input(bool eof);
    void finish(Outcome outcome);
    std::string transport_error(short what) const;

    event_base* base_;
    ApiServer server_;
    SSL_CTX* tls_;
    ApiConnections* pool_;
    std::string request_;
    bool reused_ = false;       // this connection served an earlier response
    bool got_bytes_ = false;    // any byte of this call's response arrived
    Mode mode_;
    Callbacks callbacks_;
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
    bufferevent* bev_ = nullptr;
    event* head_deadline_ = nullptr;
    std::chrono::milliseconds idle_timeout_;
    size_t scan_from_ = 0;
    bool head_done_ = false;
    bool finished_ = false;
    bool reusable_ = false;  // the response ended cleanly: the connection may serve the next call
    http1::Head head_;
    http1::BodyPump pump_;
    evbuffer* payload_ = nullptr;
    LineSplitter lines_;
    Outcome outcome_;
};

// Percent-encodes a query parameter value.
std::string url_encode(std::string_view s);

}  // namespace stepflow
