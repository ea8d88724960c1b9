// The list/watch state machine driven by scripted API answers: no sockets, no clocks.
#include <catch2/catch.hpp>

#include <map>

#include "discovery/reflector.h"

using namespace stepflow;
using Kind = Reflector::Request::Kind;
using Millis = std::chrono::milliseconds;

namespace {

struct CountingHooks : ReflectorHooks {
    int relists = 0, restarts = 0, syncs = 0;
    std::map<int, int> errors;
    std::map<std::string, int> events;
    void relist() override { ++relists; }
    void watch_restart() override { ++restarts; }
    void event(K8sWatchEvent::Type t) override { ++events[to_string(t)]; }
    void synced() override { ++syncs; }
    void api_error(int status) override { ++errors[status]; }
};

K8sObject slice(const std::string& name, const std::string& rv, std::vector<std::string> ips) {
    K8sObject o{name, rv, {}};
    K8sGroup g;
    g.ports.push_back({"http", 80});
    for (auto& ip : ips) g.addresses.push_back({ip, "pod-" + ip, true, true, false});
    o.groups.push_back(std::move(g));
    return o;
}

K8sListPage page(std::vector<K8sObject> items, std::string rv, std::string cont = "") {
    return K8sListPage{std::move(items), std::move(rv), std::move(cont)};
}

K8sWatchEvent event(K8sWatchEvent::Type type, K8sObject o) { return K8sWatchEvent{type, std::move(o), 0, ""}; }

K8sWatchEvent error_event(int code) { return K8sWatchEvent{K8sWatchEvent::Type::Error, {}, code, "x"}; }

std::vector<std::string> addresses(const SliceStore& store) {
    std::vector<Endpoint> out;
    std::string error;
    REQUIRE(store.endpoints({}, out, error));
    std::vector<std::string> a;
    for (auto& e : out) a.push_back(e.address);
    return a;
}

Reflector::Options fixed_jitter(double r = 0.0) {
    Reflector::Options o;
    o.backoff_base = Millis(500);
    o.backoff_cap = Millis(8000);
    o.random = [r] { return r; };
    return o;
}

}  // namespace

TEST_CASE("reflector: paginated list, then watch from the list's version", "[reflector]") {
    SliceStore store;
    CountingHooks hooks;
    Reflector r(store, fixed_jitter(), &hooks);
    auto req = r.start();
    CHECK(req.kind == Kind::List);
    CHECK(req.token.empty());
    auto next = r.list_page(req.id, page({slice("a", "3", {"10.0.0.1"})}, "10", "page2"));
    REQUIRE(next);
    CHECK(next->kind == Kind::List);
    CHECK(next->token == "page2");
    CHECK(store.object_count() == 0);  // nothing applied before the last page
    CHECK_FALSE(r.synced());
    auto watch = r.list_page(next->id, page({slice("b", "4", {"10.0.0.2"})}, "10"));
    REQUIRE(watch);
    CHECK(watch->kind == Kind::Watch);
    CHECK(watch->token == "10");
    CHECK(watch->delay == Millis(0));
    CHECK(r.synced());
    CHECK(r.take_changed());
    CHECK_FALSE(r.take_changed());
    CHECK(addresses(store) == std::vector<std::string>{"10.0.0.1:80", "10.0.0.2:80"});
    CHECK(hooks.relists == 0);
    CHECK(hooks.restarts == 0);
}

TEST_CASE("reflector: watch events update the store and the version; bookmarks only the version", "[reflector]") {
    SliceStore store;
    CountingHooks hooks;
    Reflector r(store, fixed_jitter(), &hooks);
    auto w = r.list_page(r.start().id, page({slice("a", "3", {"10.0.0.1"})}, "10"));
    r.take_changed();
    r.watch_opened(w->id);
    CHECK_FALSE(r.watch_event(w->id, event(K8sWatchEvent::Type::Added, slice("b", "11", {"10.0.0.2"}))));
    CHECK(r.take_changed());
    CHECK_FALSE(r.watch_event(w->id, event(K8sWatchEvent::Type::Modified, slice("a", "12", {"10.0.0.3"}))));
    CHECK(addresses(store) == std::vector<std::string>{"10.0.0.2:80", "10.0.0.3:80"});
    CHECK_FALSE(r.watch_event(w->id, event(K8sWatchEvent::Type::Deleted, slice("b", "13", {}))));
    CHECK(addresses(store) == std::vector<std::string>{"10.0.0.3:80"});
    r.take_changed();
    CHECK_FALSE(r.watch_event(w->id, event(K8sWatchEvent::Type::Bookmark, K8sObject{"", "20", {}})));
    CHECK_FALSE(r.take_changed());
    CHECK(r.resource_version() == "20");
    // The stream ends (timeoutSeconds): re-watch at once from the last version seen.
    auto again = r.watch_ended(w->id, true);
    REQUIRE(again);
    CHECK(again->kind == Kind::Watch);
    CHECK(again->token == "20");
    CHECK(again->delay == Millis(0));
    CHECK(hooks.restarts == 1);
    CHECK(hooks.events["ADDED"] == 1);
    CHECK(hooks.events["BOOKMARK"] == 1);
}

TEST_CASE("reflector: 410 at watch start and mid-stream relists; the old fleet stays until the list lands", "[reflector]") {
    SliceStore store;
    CountingHooks hooks;
    Reflector r(store, fixed_jitter(), &hooks);
    auto w = r.list_page(r.start().id, page({slice("a", "3", {"10.0.0.1"})}, "10"));
    auto relist = r.watch_failed(w->id, 410);
    REQUIRE(relist);
    CHECK(relist->kind == Kind::List);
    CHECK(relist->delay == Millis(0));
    CHECK(hooks.relists == 1);
    CHECK(addresses(store) == std::vector<std::string>{"10.0.0.1:80"});
    auto w2 = r.list_page(relist->id, page({slice("a", "30", {"10.0.0.5"})}, "40"));
    CHECK(w2->token == "40");
    r.watch_opened(w2->id);
    CHECK_FALSE(r.watch_event(w2->id, event(K8sWatchEvent::Type::Added, slice("b", "41", {"10.0.0.6"}))));
    auto relist2 = r.watch_event(w2->id, error_event(410));
    REQUIRE(relist2);
    CHECK(relist2->kind == Kind::List);
    CHECK(hooks.relists == 2);
    // Events still queued on the abandoned stream are ignored.
    CHECK_FALSE(r.watch_event(w2->id, event(K8sWatchEvent::Type::Deleted, slice("a", "42", {}))));
    CHECK(addresses(store) == std::vector<std::string>{"10.0.0.5:80", "10.0.0.6:80"});
    CHECK_FALSE(r.watch_ended(w2->id, false));
}

TEST_CASE("reflector: expired continue token restarts the list from the first page", "[reflector]") {
    SliceStore store;
    Reflector r(store, fixed_jitter());
    auto p2 = r.list_page(r.start().id, page({slice("a", "3", {"10.0.0.1"})}, "10", "c1"));
    auto restart = r.list_failed(p2->id, 410);
    REQUIRE(restart);
    CHECK(restart->kind == Kind::List);
    CHECK(restart->token.empty());
    CHECK(restart->delay == Millis(0));
    auto w = r.list_page(restart->id, page({slice("z", "9", {"10.0.0.9"})}, "12"));
    CHECK(addresses(store) == std::vector<std::string>{"10.0.0.9:80"});  // the first page's items were dropped
}

TEST_CASE("reflector: jittered exponential backoff on 5xx, 403 and connect failures, capped", "[reflector]") {
    SliceStore store;
    CountingHooks hooks;
    Reflector r(store, fixed_jitter(1.0), &hooks);  // jitter at its top: full step
    auto req = r.start();
    std::vector<int64_t> delays;
    for (int status : {500, 0, 403, 503, 500, 500, 500}) {
        auto next = r.list_failed(req.id, status);
        REQUIRE(next);
        CHECK(next->kind == Kind::List);
        delays.push_back(next->delay.count());
        req = *next;
    }
    CHECK(delays == std::vector<int64_t>{500, 1000, 2000, 4000, 8000, 8000, 8000});
    CHECK(hooks.errors[500] == 4);
    CHECK(hooks.errors[0] == 1);
    // Jitter at its bottom halves the step.
    Reflector low(store, fixed_jitter(0.0));
    auto l = low.start();
    CHECK(low.list_failed(l.id, 500)->delay == Millis(250));
    // Success resets the count.
    auto w = r.list_page(req.id, page({}, "5"));
    auto f = r.watch_failed(w->id, 500);
    CHECK(f->delay == Millis(500));
    CHECK(f->kind == Kind::Watch);
    CHECK(f->token == "5");
}

TEST_CASE("reflector: 429 honours Retry-After", "[reflector]") {
    SliceStore store;
    Reflector r(store, fixed_jitter());
    auto req = r.start();
    auto next = r.list_failed(req.id, 429, Millis(3000));
    CHECK(next->delay == Millis(3000));
    auto w = r.list_page(next->id, page({}, "1"));
    auto n2 = r.watch_failed(w->id, 429, Millis(2000));
    CHECK(n2->delay == Millis(2000));
    CHECK(n2->kind == Kind::Watch);
}

TEST_CASE("reflector: a first 401 retries at once (token re-read), a second backs off", "[reflector]") {
    SliceStore store;
    Reflector r(store, fixed_jitter(1.0));
    auto w = r.list_page(r.start().id, page({}, "1"));
    auto a = r.watch_failed(w->id, 401);
    CHECK(a->delay == Millis(0));
    auto b = r.watch_failed(a->id, 401);
    CHECK(b->delay == Millis(1000));
    r.watch_opened(b->id);
    r.watch_event(b->id, event(K8sWatchEvent::Type::Bookmark, K8sObject{"", "2", {}}));
    auto c = r.watch_ended(b->id, false);
    CHECK(c->delay == Millis(0));
    CHECK(r.watch_failed(c->id, 401)->delay == Millis(0));
}

TEST_CASE("reflector: dropped streams re-watch from the last version; empty ones back off", "[reflector]") {
    SliceStore store;
    Reflector r(store, fixed_jitter(1.0));
    auto w = r.list_page(r.start().id, page({slice("a", "3", {"10.0.0.1"})}, "10"));
    r.watch_opened(w->id);
    r.watch_event(w->id, event(K8sWatchEvent::Type::Added, slice("b", "11", {"10.0.0.2"})));
    auto a = r.watch_ended(w->id, false);  // broken mid-stream after an event
    CHECK(a->token == "11");
    CHECK(a->delay == Millis(0));
    r.watch_opened(a->id);
    auto b = r.watch_ended(a->id, true);  // quiet, clean end: at once
    CHECK(b->delay == Millis(0));
    r.watch_opened(b->id);
    auto c = r.watch_ended(b->id, true);  // again without anything: back off
    CHECK(c->delay == Millis(1000));
    CHECK(addresses(store).size() == 2);  // the fleet never went away
}

TEST_CASE("reflector: a garbled line or watch ERROR other than 410", "[reflector]") {
    SliceStore store;
    CountingHooks hooks;
    Reflector r(store, fixed_jitter(1.0), &hooks);
    auto w = r.list_page(r.start().id, page({}, "10"));
    auto l = r.watch_garbled(w->id);
    CHECK(l->kind == Kind::List);
    auto w2 = r.list_page(l->id, page({}, "11"));
    auto e = r.watch_event(w2->id, error_event(500));
    REQUIRE(e);
    CHECK(e->kind == Kind::Watch);
    CHECK(e->delay == Millis(500));
    CHECK(hooks.errors[500] == 1);
    // Answers about requests that are no longer current change nothing.
    CHECK_FALSE(r.list_failed(w2->id, 500));
    CHECK_FALSE(r.list_page(w2->id, page({}, "99")));
}

TEST_CASE("reflector: a version that keeps expiring right after its list backs off instead of spinning", "[reflector]") {
    SliceStore store;
    Reflector r(store, fixed_jitter(1.0));
    auto w = r.list_page(r.start().id, page({}, "10"));
    auto l1 = r.watch_failed(w->id, 410);
    CHECK(l1->delay == Millis(0));  // the first time: relist at once
    auto w2 = r.list_page(l1->id, page({}, "11"));
    auto l2 = r.watch_event(w2->id, error_event(410));
    CHECK(l2->kind == Kind::List);
    CHECK(l2->delay == Millis(500));  // again with nothing in between: back off
    auto w3 = r.list_page(l2->id, page({}, "12"));
    r.watch_event(w3->id, event(K8sWatchEvent::Type::Bookmark, K8sObject{"", "13", {}}));
    CHECK(r.watch_event(w3->id, error_event(410))->delay == Millis(0));  // progress resets it
}
