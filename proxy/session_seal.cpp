#include "proxy/session_seal.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <ctime>
#include <fstream>
#include <memory>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "core/text.h"

namespace stepflow {
namespace {

constexpr std::string_view kPrefixV1 = "sf1.", kPrefix = "sf2.";
constexpr std::string_view kAadV1 = "stepflow-lb session v1", kAad = "stepflow-lb session v2";
constexpr size_t kNonce = 12, kTag = 16, kTime = 8;
constexpr size_t kMaxKeys = 16;
constexpr size_t kMaxKeyFile = 64 * 1024;  // far more than 16 keys in text

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

bool open_with(const SessionKey& key, std::string_view aad, const uint8_t* raw, size_t len, std::string& plain) {
    EVP_CIPHER_CTX* ctx = thread_ctx();
    EVP_CIPHER_CTX_reset(ctx);
    const uint8_t* nonce = raw;
    const uint8_t* ct = raw + kNonce;
    size_t ct_len = len - kNonce - kTag;
    int out_len = 0;
    plain.resize(ct_len);
    if (EVP_DecryptInit_ex(ctx, cipher(), nullptr, key.data(), nonce) != 1) return false;
    if (EVP_DecryptUpdate(ctx, nullptr, &out_len, reinterpret_cast<const uint8_t*>(aad.data()), int(aad.size())) != 1)
        return false;
    if (EVP_DecryptUpdate(ctx, reinterpret_cast<uint8_t*>(plain.data()), &out_len, ct, int(ct_len)) != 1) return false;
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, int(kTag), const_cast<uint8_t*>(ct + ct_len)) != 1) return false;
    int final_len = 0;
    return EVP_DecryptFinal_ex(ctx, reinterpret_cast<uint8_t*>(plain.data()) + out_len, &final_len) == 1;
}

uint8_t key_hint(const SessionKey& key) {
    uint8_t digest[SHA256_DIGEST_LENGTH];
    SHA256(key.data(), key.size(), digest);
    return digest[0];
}

int64_t unix_now() { return int64_t(std::time(nullptr)); }

// Text: printable ASCII and whitespace only. 32 random bytes are all printable once in ~10^13.
bool is_text(std::string_view s) {
    return std::all_of(s.begin(), s.end(), [](char c) { return (c >= 0x20 && c < 0x7f) || is_ascii_space(c); });
}

bool read_small_file(const std::string& path, std::string& out, std::string& error) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        error = path + ": cannot be read";
        return false;
    }
    out.assign(kMaxKeyFile + 1, '\0');
    in.read(out.data(), std::streamsize(out.size()));
    out.resize(size_t(in.gcount()));
    if (out.size() > kMaxKeyFile) {
        error = path + ": larger than 64 KiB, not a key file";
        return false;
    }
    return true;
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

bool parse_session_key(std::string_view text, SessionKey& out, std::string& error) {
    text = trim(text, is_ascii_space);
    if (text.empty()) {
        error = "empty";
        return false;
    }
    bool hex = text.find_first_not_of("0123456789abcdefABCDEF") == std::string_view::npos;
    if (hex && text.size() == 64) {
        for (size_t i = 0; i < 32; ++i) out[i] = uint8_t(std::stoi(std::string(text.substr(2 * i, 2)), nullptr, 16));
        return true;
    }
    std::string decoded;
    if (base64url_decode(text, decoded) && decoded.size() == out.size()) {
        std::copy(decoded.begin(), decoded.end(), out.begin());
        return true;
    }
    // Say what the text looked like: the usual mistakes are a short key and a passphrase.
    if (hex)
        error = std::to_string(text.size()) + " hex digits (" + std::to_string(text.size() / 2) +
                " bytes); a key is 64 hex digits (openssl rand -hex 32)";
    else if (base64url_decode(text, decoded))
        error = "base64 decoding to " + std::to_string(decoded.size()) +
                " bytes; a key is 32 bytes (openssl rand -base64 32)";
    else
        error = "neither hex nor base64 (" + std::to_string(text.size()) +
                " characters); a key is 64 hex digits or base64 of 32 bytes (openssl rand -base64 32)";
    return false;
}

bool parse_session_keys(std::string_view content, std::vector<SessionKey>& out, std::string& error) {
    if (!is_text(content)) {
        if (content.size() == 32) {  // raw bytes, only when they cannot be read as text
            out.emplace_back();
            std::copy(content.begin(), content.end(), out.back().begin());
            return true;
        }
        error = "not text, and " + std::to_string(content.size()) + " bytes where a raw key is exactly 32";
        return false;
    }
    size_t found = 0, line_no = 0;
    while (!content.empty()) {
        size_t eol = content.find('\n');
        std::string_view line = trim(content.substr(0, eol), is_ascii_space);
        content.remove_prefix(eol == std::string_view::npos ? content.size() : eol + 1);
        ++line_no;
        if (line.empty() || line.front() == '#') continue;
        SessionKey key{};
        if (!parse_session_key(line, key, error)) {
            error = "line " + std::to_string(line_no) + ": " + error;
            return false;
        }
        out.push_back(key);
        ++found;
    }
    if (found == 0) {
        error = "no key in it (empty or only comments)";
        return false;
    }
    return true;
}

bool load_session_keys(const std::string& path, std::vector<SessionKey>& out, std::string& error) {
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0) {
        error = path + ": does not exist or cannot be read";
        return false;
    }
    std::vector<std::string> files;
    if (S_ISDIR(st.st_mode)) {
        // A Kubernetes Secret volume: one symlink per key into "..data", swapped atomically.
        DIR* dir = ::opendir(path.c_str());
        if (!dir) {
            error = path + ": directory cannot be read";
            return false;
        }
        while (dirent* d = ::readdir(dir)) {
            std::string name = d->d_name;
            if (name.empty() || name.front() == '.') continue;
            std::string file = path + "/" + name;
            struct stat fs{};
            if (::stat(file.c_str(), &fs) == 0 && S_ISREG(fs.st_mode)) files.push_back(file);
        }
        ::closedir(dir);
        std::sort(files.begin(), files.end());
        if (files.empty()) {
            error = path + ": directory holds no key file";
            return false;
        }
    } else {
        files.push_back(path);
    }
    for (const auto& file : files) {
        std::string content;
        if (!read_small_file(file, content, error)) return false;
        if (!parse_session_keys(content, out, error)) {
            error = file + ": " + error;
            return false;
        }
    }
    if (out.size() > kMaxKeys) {
        error = path + ": " + std::to_string(out.size()) + " keys; at most 16 are kept";
        return false;
    }
    return true;
}

namespace {
std::atomic<uint64_t> next_generation{1};  // across sealers: a per-thread cache never mistakes one for another
}

SessionSealer::SessionSealer(std::vector<SessionKey> keys, std::chrono::seconds max_age) : generation_(0), max_age_(max_age) {
    set_keys(std::move(keys));
}

void SessionSealer::set_keys(std::vector<SessionKey> keys) {
    auto ring = std::make_shared<Ring>();
    for (const auto& k : keys) ring->push_back({k, key_hint(k)});
    std::lock_guard lock(mutex_);
    ring_ = std::move(ring);
    generation_.store(next_generation.fetch_add(1), std::memory_order_release);
}

size_t SessionSealer::key_count() const {
    std::lock_guard lock(mutex_);
    return ring_->size();
}

const SessionSealer::Ring& SessionSealer::ring() const {
    struct Cache {
        const SessionSealer* owner = nullptr;
        uint64_t generation = 0;
        std::shared_ptr<const Ring> ring;
    };
    thread_local Cache cache;
    uint64_t g = generation_.load(std::memory_order_acquire);
    if (cache.owner != this || cache.generation != g) {
        std::lock_guard lock(mutex_);
        cache.owner = this;
        cache.generation = generation_.load(std::memory_order_relaxed);
        cache.ring = ring_;
    }
    return *cache.ring;
}

std::string SessionSealer::seal(std::string_view instance_id, std::string_view backend_session, int64_t issued_at) const {
    const Ring& keys = ring();
    if (instance_id.size() > 255 || keys.empty()) return {};
    if (issued_at == 0) issued_at = unix_now();
    std::string plain;
    plain.reserve(kTime + 1 + instance_id.size() + backend_session.size());
    for (int shift = 56; shift >= 0; shift -= 8) plain += char(uint64_t(issued_at) >> shift);
    plain += char(instance_id.size());
    plain.append(instance_id);
    plain.append(backend_session);
    std::string raw(1 + kNonce + plain.size() + kTag, '\0');
    auto* bytes = reinterpret_cast<uint8_t*>(raw.data());
    bytes[0] = keys[0].hint;
    uint8_t* nonce = bytes + 1;
    if (RAND_bytes(nonce, int(kNonce)) != 1) return {};
    EVP_CIPHER_CTX* ctx = thread_ctx();
    EVP_CIPHER_CTX_reset(ctx);
    int len = 0;
    if (EVP_EncryptInit_ex(ctx, cipher(), nullptr, keys[0].bytes.data(), nonce) != 1) return {};
    if (EVP_EncryptUpdate(ctx, nullptr, &len, reinterpret_cast<const uint8_t*>(kAad.data()), int(kAad.size())) != 1)
        return {};
    if (EVP_EncryptUpdate(ctx, nonce + kNonce, &len, reinterpret_cast<const uint8_t*>(plain.data()), int(plain.size())) != 1)
        return {};
    int final_len = 0;
    if (EVP_EncryptFinal_ex(ctx, nonce + kNonce + len, &final_len) != 1) return {};
    if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, int(kTag), nonce + kNonce + plain.size()) != 1) return {};
    return std::string(kPrefix) + base64url_encode(bytes, raw.size());
}

UnsealResult SessionSealer::unseal(std::string_view token, std::string& instance_id, std::string& backend_session,
                                   OpenedSession* opened) const {
    if (token.size() > 4096) return UnsealResult::Invalid;
    bool v1 = token.substr(0, kPrefixV1.size()) == kPrefixV1;
    if (!v1 && token.substr(0, kPrefix.size()) != kPrefix) return UnsealResult::Invalid;
    std::string raw;
    size_t header = v1 ? kNonce : 1 + kNonce;
    if (!base64url_decode(token.substr(kPrefix.size()), raw) || raw.size() < header + kTag + (v1 ? 1 : kTime + 1))
        return UnsealResult::Invalid;
    const auto* bytes = reinterpret_cast<const uint8_t*>(raw.data());
    const Ring& keys = ring();
    std::string plain;
    size_t used = keys.size();
    for (size_t i = 0; i < keys.size() && used == keys.size(); ++i) {
        if (v1 ? open_with(keys[i].bytes, kAadV1, bytes, raw.size(), plain)
               : keys[i].hint == bytes[0] && open_with(keys[i].bytes, kAad, bytes + 1, raw.size() - 1, plain))
            used = i;
    }
    if (used == keys.size()) return UnsealResult::Invalid;
    int64_t issued_at = 0;
    std::string_view rest = plain;
    if (!v1) {
        uint64_t t = 0;
        for (size_t i = 0; i < kTime; ++i) t = t << 8 | uint8_t(rest[i]);
        issued_at = int64_t(t);
        rest.remove_prefix(kTime);
    }
    size_t id_len = uint8_t(rest[0]);
    if (rest.size() < 1 + id_len) return UnsealResult::Invalid;
    if (!v1 && max_age_.count() > 0 && unix_now() - issued_at > max_age_.count()) return UnsealResult::Expired;
    instance_id.assign(rest.substr(1, id_len));
    backend_session.assign(rest.substr(1 + id_len));
    if (opened) *opened = {issued_at, v1 || used != 0};
    return UnsealResult::Ok;
}

}  // namespace stepflow
