// TLS for the client-facing listener (termination, ALPN h2/http1.1, reload on SIGHUP) and for
// connections to workers (--upstream-tls).
#pragma once

#include <memory>
#include <mutex>
#include <string>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace stepflow {

struct Config;

// The server-side context. Connections take a reference to the context current when they are
// accepted; reload() builds a new one, so open connections keep theirs and nothing is dropped.
class TlsServer {
public:
    // Loads --tls-cert/--tls-key; false with `error` set when they cannot be used.
    bool load(const std::string& cert_file, const std::string& key_file, std::string& error);
    bool reload(std::string& error) { return load(cert_file_, key_file_, error); }
    // A new SSL for an accepted connection, or nullptr.
    SSL* new_connection();
    ~TlsServer();

private:
    std::mutex mutex_;
    SSL_CTX* ctx_ = nullptr;
    std::string cert_file_, key_file_;
};

// The client-side context for worker connections.
class TlsClient {
public:
    bool init(const Config& config, std::string& error);
    // A new SSL for a connection to `host` (SNI and name verification), or nullptr.
    SSL* new_connection(const std::string& host);
    ~TlsClient();

private:
    SSL_CTX* ctx_ = nullptr;
    std::string sni_;
    bool verify_ = true;
};

// "h2", "http/1.1" or "" after a completed handshake.
std::string negotiated_protocol(SSL* ssl);

}  // namespace stepflow
