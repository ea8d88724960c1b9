#include "proxy/session_seal.h"

#include <fstream>
#include <memory>

#include <openssl/evp.h>
#include <openssl/rand.h>

namespace stepflow {
namespace {

constexpr std::string_view kPrefix = "sf1.";
constexpr std::string_view kAad = "stepflow-lb session v1";
constexpr size_t kNonce = 12, kTag = 16;

struct CtxFree {
    void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};

// One cipher context per thread, reset for each use: creating one costs more than the sealing.
EVP_CIPHER_CTX* thread_ctx() {
    thread_local std::unique_ptr<EVP_CIPHER_CTX, CtxFree> ctx(EVP_CIPHER_CTX_new());
    return ctx.get();
}

const EVP_CIPHER* cipher() {
    static const EVP_CIPHER* c = EVP_aes_256_gcm();
    return c;
}

int b64_value(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-' || c == '+') return 62;
    if (c == '_' || c == '/') return 63;
    return -1;
}

bool open_with(const SessionKey& key, const uint8_t* raw, size_t len, std::string& plain) {
    EVP_CIPHER_CTX* ctx = thread_ctx();
    EVP_CIPHER_CTX_reset(ctx);
    const uint8_t* nonce = raw;
    const uint8_t* ct = raw + kNonce;
    size_t ct_len = len - kNonce - kTag;
    int out_len = 0;
    plain.resize(ct_len);
    if (EVP_DecryptInit_ex(ctx, cipher(), nullptr, key.data(), nonce) != 1) return false;
    if (EVP_DecryptUpdate(ctx, nullptr, &out_len, reinterpret_cast<const uint8_t*>(kAad.data()), int(kAad.size())) != 1)
        return false;
    if (EVP_DecryptUpdate(ctx, reinterpret_cast<uint8_t*>(plain.data()), &out_len, ct, int(ct_len)) != 1) return false;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, int(kTag), const_cast<uint8_t*>(ct + ct_len)) != 1) return false;
    int final_len = 0;
    return EVP_DecryptFinal_ex(ctx, reinterpret_cast<uint8_t*>(plain.data()) + out_len, &final_len) == 1;
}

}  // namespace

std::string base64url_encode(const uint8_t* data, size_t len) {
    static constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    std::string out;
    out.reserve((len * 4 + 2) / 3);
    size_t i = 0;
    for (; i + 3 <= len; i += 3) {
        uint32_t v = uint32_t(data[i]) << 16 | uint32_t(data[i + 1]) << 8 | data[i + 2];
        out += kAlphabet[v >> 18];
        out += kAlphabet[(v >> 12) & 63];
        out += kAlphabet[(v >> 6) & 63];
        out += kAlphabet[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = uint32_t(data[i]) << 16;
        out += kAlphabet[v >> 18];
        out += kAlphabet[(v >> 12) & 63];
    } else if (len - i == 2) {
        uint32_t v = uint32_t(data[i]) << 16 | uint32_t(data[i + 1]) << 8;
        out += kAlphabet[v >> 18];
        out += kAlphabet[(v >> 12) & 63];
        out += kAlphabet[(v >> 6) & 63];
    }
    return out;
}

bool base64url_decode(std::string_view text, std::string& out) {
    while (!text.empty() && text.back() == '=') text.remove_suffix(1);
    if (text.size() % 4 == 1) return false;
    out.clear();
    out.reserve(text.size() * 3 / 4);
    uint32_t acc = 0;
    int bits = 0;
    for (char c : text) {
        int v = b64_value(c);
        if (v < 0) return false;
        acc = (acc << 6) | uint32_t(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out += char((acc >> bits) & 0xff);
        }
    }
    return true;
}

bool parse_session_key(std::string_view content, SessionKey& out, std::string& error) {
    if (content.size() == out.size()) {  // raw bytes
        std::copy(content.begin(), content.end(), out.begin());
        return true;
    }
    auto is_space = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
    while (!content.empty() && is_space(content.front())) content.remove_prefix(1);
    while (!content.empty() && is_space(content.back())) content.remove_suffix(1);
    if (content.size() == 64 && content.find_first_not_of("0123456789abcdefABCDEF") == std::string_view::npos) {
        for (size_t i = 0; i < 32; ++i) out[i] = uint8_t(std::stoi(std::string(content.substr(2 * i, 2)), nullptr, 16));
        return true;
    }
    std::string decoded;
    if (base64url_decode(content, decoded) && decoded.size() == out.size()) {
        std::copy(decoded.begin(), decoded.end(), out.begin());
        return true;
    }
    error = "a session key is 32 bytes: raw, 64 hex digits or base64 (e.g. openssl rand -base64 32); got " +
            std::to_string(content.size()) + " bytes of something else";
    return false;
}

bool load_session_key(const std::string& path, SessionKey& out, std::string& error) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        error = "cannot read " + path;
        return false;
    }
    std::string content(4096, '\0');  // a key is a few dozen bytes; a bigger file is not one
    in.read(content.data(), std::streamsize(content.size()));
    content.resize(size_t(in.gcount()));
    if (!parse_session_key(content, out, error)) {
        error = path + ": " + error;
        return false;
    }
    return true;
}

SessionSealer::SessionSealer(const SessionKey& current, std::optional<SessionKey> previous)
    : current_(current), previous_(previous) {}

std::string SessionSealer::seal(std::string_view instance_id, std::string_view backend_session) const {
    if (instance_id.size() > 255) return {};
    std::string plain;
    plain.reserve(1 + instance_id.size() + backend_session.size());
    plain += char(instance_id.size());
    plain.append(instance_id);
    plain.append(backend_session);
    std::string raw(kNonce + plain.size() + kTag, '\0');
    auto* bytes = reinterpret_cast<uint8_t*>(raw.data());
    if (RAND_bytes(bytes, int(kNonce)) != 1) return {};
    EVP_CIPHER_CTX* ctx = thread_ctx();
    EVP_CIPHER_CTX_reset(ctx);
    int len = 0;
    if (EVP_EncryptInit_ex(ctx, cipher(), nullptr, current_.data(), bytes) != 1) return {};
    if (EVP_EncryptUpdate(ctx, nullptr, &len, reinterpret_cast<const uint8_t*>(kAad.data()), int(kAad.size())) != 1)
        return {};
    if (EVP_EncryptUpdate(ctx, bytes + kNonce, &len, reinterpret_cast<const uint8_t*>(plain.data()), int(plain.size())) != 1)
        return {};
    int final_len = 0;
    if (EVP_EncryptFinal_ex(ctx, bytes + kNonce + len, &final_len) != 1) return {};
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, int(kTag), bytes + kNonce + plain.size()) != 1) return {};
    return std::string(kPrefix) + base64url_encode(bytes, raw.size());
}

bool SessionSealer::unseal(std::string_view token, std::string& instance_id, std::string& backend_session) const {
    if (token.size() > 4096 || token.substr(0, kPrefix.size()) != kPrefix) return false;
    std::string raw;
    if (!base64url_decode(token.substr(kPrefix.size()), raw) || raw.size() < kNonce + kTag + 1) return false;
    const auto* bytes = reinterpret_cast<const uint8_t*>(raw.data());
    std::string plain;
    if (!open_with(current_, bytes, raw.size(), plain) && !(previous_ && open_with(*previous_, bytes, raw.size(), plain)))
        return false;
    size_t id_len = uint8_t(plain[0]);
    if (plain.size() < 1 + id_len) return false;
    instance_id.assign(plain, 1, id_len);
    backend_session.assign(plain, 1 + id_len);
    return true;
}

}  // namespace stepflow
