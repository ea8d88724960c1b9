#include <catch2/catch.hpp>

#include <malloc.h>
#include <unistd.h>

#include <openssl/evp.h>

#include <atomic>
#include <cstdio>
#include <thread>
#include <ctime>
#include <filesystem>
#include <fstream>

#include "proxy/session_seal.h"
#include "proxy/session_table.h"
#include "proxy/sessions.h"

using namespace stepflow;
using namespace std::chrono_literals;

TEST_CASE("session table: remember, look up, forget, bounded by LRU, idle expiry", "[sessions]") {
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

TEST_CASE("session table: sharded above 4096 entries, bound kept", "[sessions]") {
    SessionTable t(10000, 1h);
    for (int i = 0; i < 20000; ++i) t.remember(std::string("s").append(std::to_string(i)), "i", SessionTable::Clock::now());
    CHECK(t.size() <= 10000 + 64);
    CHECK(t.evicted() >= 10000 - 64);
}

TEST_CASE("session table: instance ids interned, an entry well under 128 bytes", "[sessions]") {
    constexpr int kSessions = 100000;
    auto uuid = [](int i) {
        char id[48];
        std::snprintf(id, sizeof id, "%08x-6b1f-4c3e-9a7d-%012x", unsigned(i) * 2654435761u, unsigned(i));
        return std::string(id, 36);
    };
    std::vector<std::string> ids;
    for (int i = 0; i < kSessions; ++i) ids.push_back(uuid(i));
    std::string instance_a(36, 'a'), instance_b(36, 'b');
    size_t heap_before = mallinfo2().uordblks;
    SessionTable t(1000000, 1h);
    auto now = SessionTable::Clock::now();
    for (int i = 0; i < kSessions; ++i) t.remember(ids[size_t(i)], i % 2 ? instance_a : instance_b, now);
    size_t heap = mallinfo2().uordblks - heap_before;
    CHECK(t.size() == kSessions);
    CHECK(t.instances() == 2);  // one copy per instance, not per session
    double per_entry = double(t.bytes()) / kSessions;
    INFO("bytes per session: " << per_entry << " by the table's count, " << double(heap) / kSessions << " by the heap's");
    CHECK(per_entry < 120);
    // The allocator's own count agrees (a sanitizer's allocator reports nothing here: skipped).
    if (heap > 0) CHECK(double(heap) / kSessions < 120);
    std::string inst;
    REQUIRE(t.lookup(uuid(1), inst, now));
    CHECK(inst == instance_a);
    // Moving a session to another instance, then forgetting every session of one, frees its id.
    t.remember(uuid(1), instance_b, now);
    for (int i = 1; i < kSessions; i += 2) t.forget(uuid(i));
    CHECK(t.instances() == 1);
    CHECK(t.size() == kSessions / 2);
}

TEST_CASE("session table: full, it evicts the least recently used and still takes new sessions", "[sessions]") {
    SessionTable t(3, 1h);
    auto now = SessionTable::Clock::now();
    std::string inst;
    t.remember("a", "i1", now);
    t.remember("b", "i1", now);
    t.remember("c", "i2", now);
    REQUIRE(t.lookup("a", inst, now));  // b is now the least recently used
    for (int i = 0; i < 100; ++i) t.remember("new-" + std::to_string(i), "i3", now);
    CHECK(t.size() == 3);
    CHECK(t.evicted() == 100);
    CHECK(t.lookup("new-99", inst, now));
    CHECK(inst == "i3");
    CHECK(t.instances() == 1);  // i1 and i2 left with their last sessions
    t.forget("new-99");
    t.forget("new-98");
    t.forget("new-97");
    CHECK(t.size() == 0);
    CHECK(t.instances() == 0);
}

TEST_CASE("session table: index survives churn (backward-shift deletion)", "[sessions]") {
    SessionTable t(100000, 1h);
    auto now = SessionTable::Clock::now();
    std::string inst;
    for (int round = 0; round < 5; ++round) {
        for (int i = 0; i < 3000; ++i) t.remember("s" + std::to_string(round * 1000 + i), "i" + std::to_string(i % 7), now);
        for (int i = 0; i < 3000; i += 3) t.forget("s" + std::to_string(round * 1000 + i));
    }
    size_t expected = 0;
    for (int k = 0; k < 7000; ++k) {
        int last = std::min(4, k / 1000);  // the last round that wrote k decides
        int i = k - last * 1000;
        bool present = i % 3 != 0;
        expected += present;
        CHECK(t.lookup("s" + std::to_string(k), inst, now) == present);
        if (present) CHECK(inst == "i" + std::to_string(i % 7));
    }
    CHECK(t.size() == expected);
}

TEST_CASE("default --max-sessions follows the cgroup memory limit", "[sessions]") {
    std::string dir = "/tmp/stepflow-lb-cgroup-" + std::to_string(::getpid());
    std::filesystem::create_directories(dir);
    auto write = [&](const std::string& text) { std::ofstream(dir + "/memory.max") << text; };
    write("536870912\n");  // 512Mi, the default manifests
    size_t n = default_max_sessions(dir);
    CHECK(n == 1000000);
    CHECK(n * kSessionBudgetBytes <= 536870912 / 4);
    write("134217728\n");  // 128Mi
    CHECK(default_max_sessions(dir) == 262144);
    write("max\n");
    CHECK(default_max_sessions(dir) == 1000000);
    std::filesystem::remove_all(dir);
    CHECK(default_max_sessions(dir) == 1000000);  // not in a cgroup we can read
}

namespace {
SessionKey key_of(uint8_t b) {
    SessionKey k{};
    k.fill(b);
    return k;
}
}  // namespace

TEST_CASE("sealed ids open under any key of the ring, and nothing else", "[sessions]") {
    SessionSealer a({key_of(1)}), b({key_of(2), key_of(1)}), c({key_of(2)});
    std::string backend(64, 'x');
    std::string token = a.seal("pod-abc-123", backend);
    CHECK(token.size() < 256);
    CHECK(token.rfind("sf2.", 0) == 0);
    for (char ch : token) CHECK((ch > 32 && ch < 127));
    std::string inst, sid;
    OpenedSession opened;
    REQUIRE(a.unseal(token, inst, sid, &opened) == UnsealResult::Ok);
    CHECK(inst == "pod-abc-123");
    CHECK(sid == backend);
    CHECK_FALSE(opened.stale);
    CHECK(opened.issued_at > 1700000000);
    CHECK(b.unseal(token, inst, sid, &opened) == UnsealResult::Ok);  // an older key opens...
    CHECK(opened.stale);                                              // ...and asks for a re-seal
    CHECK(c.unseal(token, inst, sid) == UnsealResult::Invalid);       // foreign key
    CHECK(a.seal("pod-abc-123", backend) != token);                   // random nonce
    std::string flipped = token;
    flipped[10] = flipped[10] == 'A' ? 'B' : 'A';
    CHECK(a.unseal(flipped, inst, sid) == UnsealResult::Invalid);
    CHECK(a.unseal(token.substr(0, 30), inst, sid) == UnsealResult::Invalid);
    CHECK(a.unseal("sf2.", inst, sid) == UnsealResult::Invalid);
    CHECK(a.unseal("sf1.", inst, sid) == UnsealResult::Invalid);
    CHECK(a.unseal("plain-backend-id", inst, sid) == UnsealResult::Invalid);
}

TEST_CASE("key rotation: add accepted-only, make current, drop the old; re-sealing keeps the issue time", "[sessions]") {
    SessionSealer sealer({key_of(1)});
    std::string inst, sid;
    OpenedSession opened;
    std::string t1 = sealer.seal("pod-1", "backend-1", 1800000000);
    sealer.set_keys({key_of(1), key_of(2)});  // phase 1: the new key accepted, the old still seals
    REQUIRE(sealer.unseal(t1, inst, sid, &opened) == UnsealResult::Ok);
    CHECK_FALSE(opened.stale);
    sealer.set_keys({key_of(2), key_of(1)});  // phase 2: the new key seals
    REQUIRE(sealer.unseal(t1, inst, sid, &opened) == UnsealResult::Ok);
    REQUIRE(opened.stale);
    std::string t2 = sealer.seal(inst, sid, opened.issued_at);  // what the balancer hands back
    sealer.set_keys({key_of(2)});  // phase 3: the old key dropped
    CHECK(sealer.unseal(t1, inst, sid) == UnsealResult::Invalid);
    REQUIRE(sealer.unseal(t2, inst, sid, &opened) == UnsealResult::Ok);
    CHECK(inst == "pod-1");
    CHECK(sid == "backend-1");
    CHECK(opened.issued_at == 1800000000);
    CHECK_FALSE(opened.stale);
    CHECK(sealer.key_count() == 1);
}

TEST_CASE("keys replaced while other threads seal and open", "[sessions]") {
    SessionSealer sealer({key_of(1), key_of(2)});
    std::atomic<bool> stop{false};
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; ++t)
        threads.emplace_back([&] {
            std::string inst, sid;
            while (!stop.load()) {
                std::string token = sealer.seal("pod-1", "backend");
                if (sealer.unseal(token, inst, sid) != UnsealResult::Ok || inst != "pod-1") ++failures;
            }
        });
    for (int i = 0; i < 2000; ++i) sealer.set_keys(i % 2 ? std::vector{key_of(1), key_of(2)} : std::vector{key_of(2), key_of(1)});
    stop = true;
    for (auto& t : threads) t.join();
    CHECK(failures == 0);  // both keys stay in every set: whichever a thread saw, it opens
}

TEST_CASE("--session-max-age ends sealed ids by their issue time", "[sessions]") {
    SessionSealer sealer({key_of(1)}, 3600s), ageless({key_of(1)});
    std::string inst, sid;
    std::string fresh = sealer.seal("pod-1", "b");
    std::string old = sealer.seal("pod-1", "b", std::time(nullptr) - 7200);
    CHECK(sealer.unseal(fresh, inst, sid) == UnsealResult::Ok);
    CHECK(sealer.unseal(old, inst, sid) == UnsealResult::Expired);
    CHECK(ageless.unseal(old, inst, sid) == UnsealResult::Ok);
}

TEST_CASE("first-format (sf1) ids still open and are marked for re-sealing", "[sessions]") {
    // Built here as the previous release sealed them: nonce || AES-256-GCM(u8 len || id || backend) || tag.
    SessionKey k = key_of(7);
    std::string plain = std::string(1, char(5)) + "pod-9" + "backend-9";
    std::string raw(12 + plain.size() + 16, '\0');
    auto* bytes = reinterpret_cast<uint8_t*>(raw.data());
    for (int i = 0; i < 12; ++i) bytes[i] = uint8_t(i);
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    int len = 0;
    std::string_view aad = "stepflow-lb session v1";
    REQUIRE(EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, k.data(), bytes) == 1);
    REQUIRE(EVP_EncryptUpdate(ctx, nullptr, &len, reinterpret_cast<const uint8_t*>(aad.data()), int(aad.size())) == 1);
    REQUIRE(EVP_EncryptUpdate(ctx, bytes + 12, &len, reinterpret_cast<const uint8_t*>(plain.data()), int(plain.size())) == 1);
    REQUIRE(EVP_EncryptFinal_ex(ctx, bytes + 12 + len, &len) == 1);
    REQUIRE(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, bytes + 12 + plain.size()) == 1);
    EVP_CIPHER_CTX_free(ctx);
    std::string token = "sf1." + base64url_encode(bytes, raw.size());
    SessionSealer sealer({key_of(7)});
    std::string inst, sid;
    OpenedSession opened;
    REQUIRE(sealer.unseal(token, inst, sid, &opened) == UnsealResult::Ok);
    CHECK(inst == "pod-9");
    CHECK(sid == "backend-9");
    CHECK(opened.stale);
}

TEST_CASE("session keys: hex or base64 text of 32 bytes, raw only when not text", "[sessions]") {
    SessionKey k{};
    std::string err;
    CHECK(parse_session_key(std::string(64, 'a') + "\n", k, err));
    CHECK(k[0] == 0xaa);
    CHECK(parse_session_key("  AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", k, err));
    CHECK(k[31] == 31);
    CHECK(parse_session_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8", k, err));  // unpadded
    CHECK_FALSE(parse_session_key("short", k, err));

    std::vector<SessionKey> keys;
    // A 32-character passphrase is text: never taken as a raw key.
    CHECK_FALSE(parse_session_keys("correct-horse-battery-staple-123", keys, err));
    CHECK(err.find("32 bytes") != std::string::npos);
    // openssl rand -hex 16 without a newline: 32 hex digits, 16 bytes.
    CHECK_FALSE(parse_session_keys("00112233445566778899aabbccddeeff", keys, err));
    CHECK(err.find("32 hex digits") != std::string::npos);
    CHECK_FALSE(parse_session_keys("", keys, err));
    CHECK_FALSE(parse_session_keys("\n# only a comment\n", keys, err));
    CHECK(err.find("no key") != std::string::npos);
    std::string raw(32, '\0');
    for (size_t i = 0; i < raw.size(); ++i) raw[i] = char(0x80 + i);
    REQUIRE(parse_session_keys(raw, keys, err));
    CHECK(keys.back()[0] == 0x80);
    CHECK_FALSE(parse_session_keys(raw + '\x90', keys, err));  // binary, but not 32 bytes
    CHECK(err.find("33 bytes") != std::string::npos);
    keys.clear();
    REQUIRE(parse_session_keys("# new\n" + std::string(64, 'b') + "\n\n  " + std::string(64, 'c') + "  \n", keys, err));
    REQUIRE(keys.size() == 2);
    CHECK(keys[0][0] == 0xbb);
    CHECK(keys[1][0] == 0xcc);
    CHECK_FALSE(parse_session_keys(std::string(64, 'b') + "\nnot-a-key\n", keys, err));
    CHECK(err.find("line 2") != std::string::npos);
}

TEST_CASE("session key files: a file or a directory of files, errors name the file", "[sessions]") {
    namespace fs = std::filesystem;
    fs::path dir = "/tmp/stepflow-lb-keys-" + std::to_string(::getpid());
    fs::create_directories(dir / "..2026_12_07");
    std::ofstream(dir / "..2026_12_07" / "a-current") << std::string(64, '1') << "\n";
    std::ofstream(dir / "..2026_12_07" / "b-previous") << std::string(64, '2') << "\n";
    fs::create_directory_symlink("..2026_12_07", dir / "..data");
    fs::create_symlink("..data/a-current", dir / "a-current");
    fs::create_symlink("..data/b-previous", dir / "b-previous");
    std::vector<SessionKey> keys;
    std::string err;
    REQUIRE(load_session_keys(dir.string(), keys, err));
    REQUIRE(keys.size() == 2);  // the ..data and dated folders are skipped
    CHECK(keys[0][0] == 0x11);
    CHECK(keys[1][0] == 0x22);
    std::ofstream(dir / "..2026_12_07" / "b-previous") << "too-short";
    keys.clear();
    CHECK_FALSE(load_session_keys(dir.string(), keys, err));
    CHECK(err.find("b-previous") != std::string::npos);
    keys.clear();
    CHECK_FALSE(load_session_keys((dir / "missing").string(), keys, err));
    CHECK(err.find("missing") != std::string::npos);
    fs::remove_all(dir);
}

TEST_CASE("MCP method names map to a fixed set") {
    CHECK(mcp_method_index("tools/call") < kMcpMethods);
    CHECK(mcp_method_index("initialize") < kMcpMethods);
    CHECK(mcp_method_index("whatever/else") == kMcpMethods);
}
