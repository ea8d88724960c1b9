#include "core/tls.h"

#include <cstring>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "core/config.h"

namespace stepflow {
namespace {

std::string openssl_error() {
    unsigned long e = ERR_get_error();
    if (e == 0) return "unknown OpenSSL error";
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    return buf;
}

// Prefer h2, then http/1.1. A client that offers neither gets a no_application_protocol alert
// (RFC 7301 §3.2) instead of a protocol it did not ask for.
int select_alpn(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in, unsigned inlen,
                void*) {
    static const unsigned char h2[] = {2, 'h', '2'};
    static const unsigned char h11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    for (const unsigned char* want : {h2, h11}) {
        for (unsigned i = 0; i < inlen; i += 1u + in[i]) {
            if (in[i] == want[0] && i + 1u + in[i] <= inlen && std::memcmp(in + i + 1, want + 1, want[0]) == 0) {
                *out = in + i + 1;
                *outlen = in[i];
                return SSL_TLSEXT_ERR_OK;
            }
        }
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

// TLS 1.2 ciphers: forward-secret AEAD suites only (TLS 1.3 suites are all AEAD already).
constexpr const char* kCiphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

}  // namespace

bool TlsServer::load(const std::string& cert_file, const std::string& key_file, std::string& error) {
    SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        error = openssl_error();
        return false;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_cipher_list(ctx, kCiphers);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file.c_str()) != 1) {
        error = "cannot load certificate '" + cert_file + "': " + openssl_error();
        SSL_CTX_free(ctx);
        return false;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
        error = "cannot load private key '" + key_file + "': " + openssl_error();
        SSL_CTX_free(ctx);
        return false;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        error = "private key '" + key_file + "' does not match certificate '" + cert_file + "'";
        SSL_CTX_free(ctx);
        return false;
    }
    SSL_CTX_set_alpn_select_cb(ctx, select_alpn, nullptr);
    std::lock_guard lock(mutex_);
    if (ctx_) SSL_CTX_free(ctx_);  // connections hold their own reference through their SSL
    ctx_ = ctx;
    cert_file_ = cert_file;
    key_file_ = key_file;
    return true;
}

SSL* TlsServer::new_connection() {
    std::lock_guard lock(mutex_);
    return ctx_ ? SSL_new(ctx_) : nullptr;
}

TlsServer::~TlsServer() {
    if (ctx_) SSL_CTX_free(ctx_);
}

bool TlsClient::init(const Config& config, std::string& error) {
    ctx_ = SSL_CTX_new(TLS_client_method());
    if (!ctx_) {
        error = openssl_error();
        return false;
    }
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    verify_ = !config.upstream_insecure;
    if (verify_) {
        SSL_CTX_set_verify(ctx_, SSL_VERIFY_PEER, nullptr);
        int ok = config.upstream_ca.empty() ? SSL_CTX_set_default_verify_paths(ctx_)
                                            : SSL_CTX_load_verify_locations(ctx_, config.upstream_ca.c_str(), nullptr);
        if (ok != 1) {
            error = "cannot load --upstream-ca '" + config.upstream_ca + "': " + openssl_error();
            return false;
        }
    }
    static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
    SSL_CTX_set_alpn_protos(ctx_, alpn, sizeof alpn);
    sni_ = config.upstream_sni;
    return true;
}

SSL* TlsClient::new_connection(const std::string& host) {
    SSL* ssl = SSL_new(ctx_);
    if (!ssl) return nullptr;
    const std::string& name = sni_.empty() ? host : sni_;
    unsigned char ip[16];
    bool is_ip = inet_pton(AF_INET, name.c_str(), ip) == 1 || inet_pton(AF_INET6, name.c_str(), ip) == 1;
    // SSL_set_tlsext_host_name is a macro with an old-style cast; this is what it expands to.
    if (!is_ip) SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, const_cast<char*>(name.c_str()));
    if (verify_) {
        X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
        if (is_ip) X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str());
        else X509_VERIFY_PARAM_set1_host(param, name.c_str(), 0);
    }
    return ssl;
}

TlsClient::~TlsClient() {
    if (ctx_) SSL_CTX_free(ctx_);
}

std::string negotiated_protocol(SSL* ssl) {
    const unsigned char* data = nullptr;
    unsigned len = 0;
    SSL_get0_alpn_selected(ssl, &data, &len);
    return std::string(reinterpret_cast<const char*>(data), len);
}

}  // namespace stepflow
