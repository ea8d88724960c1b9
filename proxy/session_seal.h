// Sealed session ids (--session-key-file): the id a client sees carries the instance identity and
// the backend's own session id, encrypted and authenticated with AES-256-GCM under a key every
// replica shares, so any replica, or a restarted one, routes it without a shared table.
//
// Token: "sf2." + base64url(key hint[1] || nonce[12] || ciphertext || tag[16]), no padding.
// Plaintext: u64 issue time (unix seconds, big-endian) || u8 length of the instance id ||
// instance id || backend session id. Additional data: "stepflow-lb session v2". The key hint is
// the first byte of SHA-256(key): only keys with that hint are tried. Tokens of the first format
// ("sf1.", no issue time) still open and are re-sealed. See docs/sessions.md.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace stepflow {

using SessionKey = std::array<uint8_t, 32>;

// One key as text: 64 hex digits or base64/base64url (padding optional), surrounding whitespace
// trimmed, decoding to exactly 32 bytes. False with `error` saying what was wrong.
bool parse_session_key(std::string_view text, SessionKey& out, std::string& error);
// A key file's content: text with one key per line (blank lines and lines starting with # are
// skipped), or exactly 32 raw bytes when the content is not text. Keys are appended to `out`.
bool parse_session_keys(std::string_view content, std::vector<SessionKey>& out, std::string& error);
// A file, or a directory whose files (names not starting with '.', in name order) each hold
// keys: the first key found seals, all open. Errors name the file.
bool load_session_keys(const std::string& path, std::vector<SessionKey>& out, std::string& error);

enum class UnsealResult : uint8_t { Ok, Invalid, Expired };

struct OpenedSession {
    int64_t issued_at = 0;  // unix seconds; 0 for a first-format token
    bool stale = false;     // opened with a key other than the current one, or an older format: re-seal it
};

class SessionSealer {
public:
    // keys[0] seals, every key opens. `max_age` 0: tokens never expire.
    explicit SessionSealer(std::vector<SessionKey> keys, std::chrono::seconds max_age = std::chrono::seconds(0));

    // Replaces the keys (a reload). Requests in flight finish with the keys they started with.
    void set_keys(std::vector<SessionKey> keys);
    size_t key_count() const;

    // Seals under the current key; empty when the instance id is longer than 255 bytes.
    // `issued_at` 0 means now (a new session); a re-seal passes the original time.
    std::string seal(std::string_view instance_id, std::string_view backend_session, int64_t issued_at = 0) const;
    // Opens a token sealed under any of the keys. Invalid for anything forged, truncated, or
    // sealed under another key; Expired when older than max_age.
    UnsealResult unseal(std::string_view token, std::string& instance_id, std::string& backend_session,
                        OpenedSession* opened = nullptr) const;

private:
    struct Key {
        SessionKey bytes;
        uint8_t hint;
    };
    using Ring = std::vector<Key>;
    const Ring& ring() const;  // the current keys, cached per thread: one atomic load per call

    mutable std::mutex mutex_;
    std::shared_ptr<const Ring> ring_;
    std::atomic<uint64_t> generation_;
    std::chrono::seconds max_age_;
};

std::string base64url_encode(const uint8_t* data, size_t len);
bool base64url_decode(std::string_view text, std::string& out);  // also takes standard base64

}  // namespace stepflow
