#include <catch2/catch.hpp>

#include "proxy/session_seal.h"
#include "proxy/session_table.h"
#include "proxy/sessions.h"

using namespace stepflow;
using namespace std::chrono_literals;

TEST_CASE("session table: remember, look up, forget, bounded by LRU, idle expiry") {
    SessionTable t(2, 1000ms);
    auto now = SessionTable::Clock::now();
    std::string id;
    t.remember("s1", "i1", now);
    t.remember("s2", "i2", now);
    REQUIRE(t.lookup("s1", id, now));  // s1 now most recently used
    CHECK(id == "i1");
    t.remember("s3", "i3", now);       // evicts s2
    CHECK(t.evicted() == 1);
    CHECK_FALSE(t.lookup("s2", id, now));
    CHECK(t.lookup("s3", id, now));
    t.forget("s3");
    CHECK_FALSE(t.lookup("s3", id, now));
    CHECK_FALSE(t.lookup("s1", id, now + 2s));  // idle past the timeout
    CHECK(t.expired() == 1);
    CHECK(t.size() == 0);
}

TEST_CASE("session table: sharded above 4096 entries, bound kept") {
    SessionTable t(10000, 1h);
    for (int i = 0; i < 20000; ++i) t.remember(std::string("s").append(std::to_string(i)), "i", SessionTable::Clock::now());
    CHECK(t.size() <= 10000 + 64);
    CHECK(t.evicted() >= 10000 - 64);
}

TEST_CASE("sealed ids open under the same key, the previous key, and nothing else") {
    SessionKey k1{}, k2{};
    k1.fill(1);
    k2.fill(2);
    SessionSealer a(k1, std::nullopt), b(k2, k1), c(k2, std::nullopt);
    std::string backend(64, 'x');
    std::string token = a.seal("pod-abc-123", backend);
    CHECK(token.size() < 256);
    CHECK(token.rfind("sf1.", 0) == 0);
    for (char ch : token) CHECK((ch > 32 && ch < 127));
    std::string inst, sid;
    REQUIRE(a.unseal(token, inst, sid));
    CHECK(inst == "pod-abc-123");
    CHECK(sid == backend);
    CHECK(b.unseal(token, inst, sid));       // previous key
    CHECK_FALSE(c.unseal(token, inst, sid));  // foreign key
    CHECK(a.seal("pod-abc-123", backend) != token);  // random nonce
    std::string flipped = token;
    flipped[10] = flipped[10] == 'A' ? 'B' : 'A';
    CHECK_FALSE(a.unseal(flipped, inst, sid));
    CHECK_FALSE(a.unseal(token.substr(0, 30), inst, sid));
    CHECK_FALSE(a.unseal("sf1.", inst, sid));
    CHECK_FALSE(a.unseal("plain-backend-id", inst, sid));
}

TEST_CASE("session keys: raw, hex or base64, 32 bytes") {
    SessionKey k{};
    std::string err;
    CHECK(parse_session_key(std::string(32, 'k'), k, err));
    CHECK(parse_session_key(std::string(64, 'a') + "\n", k, err));
    CHECK(k[0] == 0xaa);
    CHECK(parse_session_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", k, err));
    CHECK(k[31] == 31);
    CHECK_FALSE(parse_session_key("short", k, err));
    CHECK(err.find("32 bytes") != std::string::npos);
}

TEST_CASE("MCP method names map to a fixed set") {
    CHECK(mcp_method_index("tools/call") < kMcpMethods);
    CHECK(mcp_method_index("initialize") < kMcpMethods);
    CHECK(mcp_method_index("whatever/else") == kMcpMethods);
}
