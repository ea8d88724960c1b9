// Decoding the API's JSON, the slice store's union, and the watch-stream line splitter.
#include <catch2/catch.hpp>

#include <simdjson.h>

#include <event2/buffer.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <unistd.h>

#include "discovery/k8s_client.h"
#include "discovery/k8s_line_splitter.h"
#include "discovery/k8s_objects.h"
#include "discovery/k8s_slice_store.h"

using namespace stepflow;

namespace {

std::string slice_json(const std::string& name, const std::string& rv, const std::string& endpoints,
                       const std::string& ports = R"([{"name":"http","port":8080,"protocol":"TCP"}])",
                       const std::string& type = "IPv4") {
    return R"({"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":")" + name +
           R"(","namespace":"ns","resourceVersion":")" + rv +
           R"(","labels":{"kubernetes.io/service-name":"svc"}},"addressType":")" + type +
           R"(","endpoints":)" + endpoints + R"(,"ports":)" + ports + "}";
}

std::string ep(const std::string& ip, const std::string& pod, const std::string& conditions) {
    return R"({"addresses":[")" + ip + R"("],"conditions":)" + conditions +
           R"(,"targetRef":{"kind":"Pod","namespace":"ns","name":")" + pod + R"("}})";
}

K8sObject decode_slice(const std::string& json) {
    simdjson::dom::parser parser;
    K8sWatchEvent ev;
    std::string error;
    REQUIRE(decode_watch_event(parser, R"({"type":"ADDED","object":)" + json + "}", K8sKind::EndpointSlices, ev, error));
    return ev.object;
}

}  // namespace

TEST_CASE("EndpointSlice decoding: conditions, defaults, targetRef", "[k8s]") {
    auto o = decode_slice(slice_json(
        "s1", "17",
        "[" + ep("10.0.0.1", "w-1", R"({"ready":true,"serving":true,"terminating":false})") + "," +
            ep("10.0.0.2", "w-2", R"({"ready":false,"serving":true,"terminating":true})") + "," +
            ep("10.0.0.3", "w-3", R"({})") + "," +  // absent: ready, serving like ready
            ep("10.0.0.4", "w-4", R"({"ready":false})") + "," +
            R"({"addresses":["10.0.0.5"]})" + "]"));
    CHECK(o.name == "s1");
    CHECK(o.resource_version == "17");
    REQUIRE(o.groups.size() == 1);
    auto& g = o.groups[0];
    REQUIRE(g.ports.size() == 1);
    CHECK(g.ports[0].name == "http");
    CHECK(g.ports[0].port == 8080);
    REQUIRE(g.addresses.size() == 5);
    CHECK(g.addresses[0].pod == "w-1");
    CHECK((g.addresses[0].ready && g.addresses[0].serving && !g.addresses[0].terminating));
    CHECK((!g.addresses[1].ready && g.addresses[1].serving && g.addresses[1].terminating));
    CHECK((g.addresses[2].ready && g.addresses[2].serving && !g.addresses[2].terminating));
    CHECK((!g.addresses[3].ready && !g.addresses[3].serving));
    CHECK((g.addresses[4].ready && g.addresses[4].pod.empty()));
}

TEST_CASE("EndpointSlice decoding: null lists are empty, FQDN and UDP are skipped", "[k8s]") {
    auto o = decode_slice(slice_json("s", "1", "null", "null"));
    REQUIRE(o.groups.size() == 1);
    CHECK(o.groups[0].addresses.empty());
    CHECK(o.groups[0].ports.empty());
    auto fq = decode_slice(slice_json("s", "1", "[" + ep("a.example", "p", "{}") + "]", R"([{"port":80}])", "FQDN"));
    CHECK(fq.groups[0].addresses.empty());
    auto udp = decode_slice(slice_json("s", "1", "[]", R"([{"name":"dns","port":53,"protocol":"UDP"},{"port":80}])"));
    REQUIRE(udp.groups[0].ports.size() == 1);
    CHECK(udp.groups[0].ports[0].port == 80);
}

TEST_CASE("list decoding: items, resourceVersion, continue, null items", "[k8s]") {
    simdjson::dom::parser parser;
    K8sListPage page;
    std::string error;
    std::string body = R"({"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"99","continue":"tok"},"items":[)" +
                       slice_json("a", "5", "[]") + "," + slice_json("b", "6", "null") + "]}";
    REQUIRE(decode_list(parser, body, K8sKind::EndpointSlices, page, error));
    CHECK(page.items.size() == 2);
    CHECK(page.resource_version == "99");
    CHECK(page.continue_token == "tok");
    REQUIRE(decode_list(parser, R"({"metadata":{"resourceVersion":"3"},"items":null})", K8sKind::EndpointSlices, page, error));
    CHECK(page.items.empty());
    CHECK_FALSE(decode_list(parser, R"({"items":[]})", K8sKind::EndpointSlices, page, error));
    CHECK_FALSE(decode_list(parser, "{\"metadata\":", K8sKind::EndpointSlices, page, error));
}

TEST_CASE("watch events: bookmark, deleted, error 410, junk", "[k8s]") {
    simdjson::dom::parser parser;
    K8sWatchEvent ev;
    std::string error;
    REQUIRE(decode_watch_event(parser,
                               R"({"type":"BOOKMARK","object":{"kind":"EndpointSlice","metadata":{"resourceVersion":"123","annotations":{"k8s.io/initial-events-end":"true"}}}})",
                               K8sKind::EndpointSlices, ev, error));
    CHECK(ev.type == K8sWatchEvent::Type::Bookmark);
    CHECK(ev.object.resource_version == "123");
    REQUIRE(decode_watch_event(parser,
                               R"j({"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (5)","reason":"Expired","code":410}})j",
                               K8sKind::EndpointSlices, ev, error));
    CHECK(ev.type == K8sWatchEvent::Type::Error);
    CHECK(ev.error_code == 410);
    CHECK(ev.message.find("too old") != std::string::npos);
    REQUIRE(decode_watch_event(parser, R"({"type":"DELETED","object":)" + slice_json("gone", "8", "[]") + "}",
                               K8sKind::EndpointSlices, ev, error));
    CHECK(ev.type == K8sWatchEvent::Type::Deleted);
    CHECK(ev.object.name == "gone");
    CHECK_FALSE(decode_watch_event(parser, R"({"type":"WHAT","object":{}})", K8sKind::EndpointSlices, ev, error));
    CHECK_FALSE(decode_watch_event(parser, R"({"type":"ADDED"})", K8sKind::EndpointSlices, ev, error));
    CHECK_FALSE(decode_watch_event(parser, R"({"type":"ADDED","object":{"metadata":{"na)", K8sKind::EndpointSlices, ev, error));
}

TEST_CASE("v1 Endpoints decoding: subsets, notReadyAddresses, named ports", "[k8s]") {
    simdjson::dom::parser parser;
    K8sListPage page;
    std::string error;
    std::string body = R"({"kind":"EndpointsList","metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"svc","resourceVersion":"6"},"subsets":[
        {"addresses":[{"ip":"10.1.0.1","targetRef":{"kind":"Pod","name":"w-1"}}],"notReadyAddresses":[{"ip":"10.1.0.2","targetRef":{"kind":"Pod","name":"w-2"}}],
         "ports":[{"name":"http","port":8080,"protocol":"TCP"},{"name":"metrics","port":9100}]},
        {"addresses":null,"notReadyAddresses":[{"ip":"fd00::3"}],"ports":[{"name":"http","port":8081}]}]}]})";
    REQUIRE(decode_list(parser, body, K8sKind::Endpoints, page, error));
    REQUIRE(page.items.size() == 1);
    SliceStore store;
    store.replace(page.items);
    std::vector<Endpoint> out;
    REQUIRE(store.endpoints({"http", 0}, out, error));
    REQUIRE(out.size() == 3);
    CHECK(out[0].address == "10.1.0.1:8080");
    CHECK(out[0].pod == "w-1");
    CHECK(out[0].ready);
    CHECK(out[1].address == "10.1.0.2:8080");
    CHECK((!out[1].ready && !out[1].serving));
    CHECK(out[2].address == "[fd00::3]:8081");
    CHECK_FALSE(store.endpoints({}, out, error));  // two port names and none chosen
    CHECK(error.find("--port-name") != std::string::npos);
    REQUIRE(store.endpoints({"", 9100}, out, error));
    CHECK(out.size() == 2);
}

TEST_CASE("slice store: union of slices, deduplicated, stable through a move", "[k8s]") {
    SliceStore store;
    auto a = decode_slice(slice_json("a", "1", "[" + ep("10.0.0.1", "p1", "{}") + "," + ep("10.0.0.2", "p2", "{}") + "]"));
    auto b = decode_slice(slice_json("b", "2", "[" + ep("fd00::1", "p3", "{}") + "]", R"([{"name":"http","port":9000}])", "IPv6"));
    store.replace({a, b});
    std::vector<Endpoint> out;
    std::string error;
    REQUIRE(store.endpoints({}, out, error));  // one port name across slices (numbers differ)
    REQUIRE(out.size() == 3);
    CHECK(out[0].address == "10.0.0.1:8080");
    CHECK(out[2].address == "[fd00::1]:9000");

    // p2 moves from a to c in two writes: first added to c, then removed from a.
    auto c = decode_slice(slice_json("c", "3", "[" + ep("10.0.0.2", "p2", "{}") + "]"));
    store.upsert(c);
    REQUIRE(store.endpoints({}, out, error));
    CHECK(out.size() == 3);
    store.upsert(decode_slice(slice_json("a", "4", "[" + ep("10.0.0.1", "p1", "{}") + "]")));
    REQUIRE(store.endpoints({}, out, error));
    REQUIRE(out.size() == 3);
    CHECK(out[1].address == "10.0.0.2:8080");
    store.remove("c");
    REQUIRE(store.endpoints({}, out, error));
    CHECK(out.size() == 2);

    // Duplicates that disagree: the most useful view wins whatever the slice order.
    store.replace({decode_slice(slice_json("x", "1", "[" + ep("10.0.0.9", "p", R"({"ready":false,"serving":false})") + "]")),
                   decode_slice(slice_json("y", "1", "[" + ep("10.0.0.9", "p", R"({"ready":true})") + "]"))});
    REQUIRE(store.endpoints({}, out, error));
    REQUIRE(out.size() == 1);
    CHECK(out[0].ready);
}

TEST_CASE("slice store: port selection by name and number", "[k8s]") {
    SliceStore store;
    store.replace({decode_slice(slice_json("a", "1", "[" + ep("10.0.0.1", "p1", "{}") + "]",
                                           R"([{"name":"http","port":8080},{"name":"metrics","port":9100}])"))});
    std::vector<Endpoint> out;
    std::string error;
    CHECK_FALSE(store.endpoints({}, out, error));
    CHECK(error.find("http:8080") != std::string::npos);
    REQUIRE(store.endpoints({"metrics", 0}, out, error));
    CHECK(out.at(0).address == "10.0.0.1:9100");
    REQUIRE(store.endpoints({"", 8080}, out, error));
    CHECK(out.at(0).address == "10.0.0.1:8080");
    REQUIRE(store.endpoints({"nope", 0}, out, error));
    CHECK(out.empty());
}

TEST_CASE("line splitter: events split across reads, several per read, never half", "[k8s]") {
    LineSplitter splitter(1024);
    std::vector<std::string> lines;
    auto collect = [&](std::string_view l) { lines.emplace_back(l); return true; };
    REQUIRE(splitter.feed(R"({"type":"ADD)", collect));
    CHECK(lines.empty());
    REQUIRE(splitter.feed(R"(ED"})", collect));
    CHECK(lines.empty());
    REQUIRE(splitter.feed("\n{\"a\":1}\r\n\n{\"b\"", collect));
    REQUIRE(lines.size() == 2);
    CHECK(lines[0] == R"({"type":"ADDED"})");
    CHECK(lines[1] == R"({"a":1})");
    CHECK(splitter.pending() == 4);
    // Byte by byte through an evbuffer.
    std::string rest = ":2}\n{\"c\":3}\n";
    for (char ch : rest) {
        evbuffer* b = evbuffer_new();
        evbuffer_add(b, &ch, 1);
        REQUIRE(splitter.feed(b, collect));
        CHECK(evbuffer_get_length(b) == 0);
        evbuffer_free(b);
    }
    REQUIRE(lines.size() == 4);
    CHECK(lines[2] == R"({"b":2})");
    CHECK(lines[3] == R"({"c":3})");
    // Stopping early leaves the rest buffered for the next feed.
    int seen = 0;
    REQUIRE(splitter.feed("x\ny\n", [&](std::string_view) { return ++seen < 1; }));
    CHECK(seen == 1);
    REQUIRE(splitter.feed("", collect));
    CHECK(lines.back() == "y");
    // A line beyond the limit fails the stream.
    CHECK_FALSE(splitter.feed(std::string(2000, 'z'), collect));
}

TEST_CASE("token source: re-read at least once a minute and at once after invalidate", "[k8s]") {
    char path[] = "/tmp/k8s-token-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    auto write_token = [&](const std::string& t) {
        FILE* f = std::fopen(path, "w");
        std::fputs(t.c_str(), f);
        std::fclose(f);
    };
    write_token("one\n");
    TokenSource tokens(path);
    auto now = std::chrono::steady_clock::time_point{} + std::chrono::hours(1);
    tokens.now = [&] { return now; };
    CHECK(tokens.get() == "one");
    write_token("two");
    now += std::chrono::seconds(30);
    CHECK(tokens.get() == "one");  // cached within the minute
    tokens.invalidate();           // a 401
    CHECK(tokens.get() == "two");
    write_token("three");
    now += std::chrono::seconds(61);
    CHECK(tokens.get() == "three");
    std::remove(path);
    now += std::chrono::seconds(61);
    CHECK(tokens.get() == "three");  // a briefly missing file keeps the last token
    ::close(fd);
}

TEST_CASE("API server URLs and query encoding", "[k8s]") {
    ApiServer s;
    std::string error;
    REQUIRE(parse_api_server("https://10.96.0.1:443", s, error));
    CHECK((s.tls && s.host == "10.96.0.1" && s.port == 443 && s.base_path.empty()));
    REQUIRE(parse_api_server("http://127.0.0.1:8001/proxy/", s, error));
    CHECK((!s.tls && s.port == 8001 && s.base_path == "/proxy"));
    REQUIRE(parse_api_server("https://[::1]:6443", s, error));
    CHECK((s.host == "::1" && s.port == 6443));
    REQUIRE(parse_api_server("https://[fd00::1]", s, error));
    CHECK((s.host == "fd00::1" && s.port == 443));
    CHECK_FALSE(parse_api_server("ftp://x", s, error));
    CHECK(url_encode("kubernetes.io/service-name=w") == "kubernetes.io%2Fservice-name%3Dw");
}
