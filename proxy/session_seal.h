// Sealed session ids (--session-key-file): the id a client sees carries the instance identity and
// the backend's own session id, encrypted and authenticated with AES-256-GCM under a key every
// replica shares, so any replica, or a restarted one, routes it without a shared table.
//
// Token: "sf1." + base64url(nonce[12] || ciphertext || tag[16]), no padding.
// Plaintext: u8 length of the instance id || instance id || backend session id.
// Additional data: "stepflow-lb session v1". See docs/sessions.md.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace stepflow {

using SessionKey = std::array<uint8_t, 32>;

// A key file holds 32 bytes: raw, or as 64 hex digits, or as base64/base64url text (surrounding
// whitespace ignored). False with `error` set otherwise.
bool parse_session_key(std::string_view file_content, SessionKey& out, std::string& error);
bool load_session_key(const std::string& path, SessionKey& out, std::string& error);

class SessionSealer {
public:
    SessionSealer(const SessionKey& current, std::optional<SessionKey> previous);

    // Seals under the current key; empty when the instance id is longer than 255 bytes.
    std::string seal(std::string_view instance_id, std::string_view backend_session) const;
    // Opens a token sealed under the current or the previous key. False for anything forged,
    // truncated, or sealed under another key.
    bool unseal(std::string_view token, std::string& instance_id, std::string& backend_session) const;

private:
    SessionKey current_;
    std::optional<SessionKey> previous_;
};

std::string base64url_encode(const uint8_t* data, size_t len);
bool base64url_decode(std::string_view text, std::string& out);  // also takes standard base64

}  // namespace stepflow
