// The list/watch loop as a small state machine, after client-go's Reflector: list (page by page),
// watch from the list's resourceVersion, re-watch from the last version seen when a stream ends,
// relist when the version has expired (410), back off with jitter on errors. It does no I/O and
// keeps no time: every input says what happened to the request it asked for, and the answer is
// the next request to send (and how long to wait first). So tests script it step by step, and
// the K8sSource driver runs it on libevent.
//
// Through API trouble the store keeps the last state it was given; only a completed list or a
// watch event changes it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "discovery/k8s_objects.h"
#include "discovery/k8s_slice_store.h"

namespace stepflow {

// What the loop reports for metrics and logs. Every method has a default that does nothing.
class ReflectorHooks {
public:
    virtual ~ReflectorHooks() = default;
    virtual void relist() {}                          // a list started after the first one
    virtual void watch_restart() {}                   // a watch started other than right after a list
    virtual void event(K8sWatchEvent::Type) {}        // a watch event arrived
    virtual void synced() {}                          // the store now matches the API
    virtual void api_error(int /*status, 0 = network*/) {}
};

class Reflector {
public:
    using Millis = std::chrono::milliseconds;

    struct Request {
        enum class Kind { List, Watch };
        Kind kind = Kind::List;
        std::string token;  // List: the continue token ("" for a first page); Watch: resourceVersion
        Millis delay{0};    // wait this long before sending it
        uint64_t id = 0;    // name this request in every input about it
    };

    struct Options {
        Millis backoff_base{500};
        Millis backoff_cap{30000};
        std::function<double()> random;  // uniform in [0,1); default: a seeded engine
    };

    Reflector(SliceStore& store, Options options, ReflectorHooks* hooks = nullptr);

    Request start();

    // List answers. A 410 on a continued page (continue token expired) restarts the list at once.
    std::optional<Request> list_page(uint64_t id, K8sListPage page);
    std::optional<Request> list_failed(uint64_t id, int status, Millis retry_after = Millis(0));

    // Watch answers: a 200 head, then events, then the end of the stream. A watch that fails
    // before its head (connect error, non-200) is watch_failed; after it, watch_ended.
    void watch_opened(uint64_t id);
    std::optional<Request> watch_event(uint64_t id, K8sWatchEvent event);
    std::optional<Request> watch_failed(uint64_t id, int status, Millis retry_after = Millis(0));
    std::optional<Request> watch_ended(uint64_t id, bool clean);
    // A line that did not decode: events may have been missed, so only a relist is safe.
    std::optional<Request> watch_garbled(uint64_t id);

    bool synced() const { return synced_; }
    // True once after each change to the store's contents.
    bool take_changed() { return std::exchange(changed_, false); }
    const std::string& resource_version() const { return resource_version_; }
    int consecutive_failures() const { return failures_; }
    uint64_t current_id() const { return id_; }

private:
    Request next(Request::Kind kind, std::string token, Millis delay);
    Request relist_now();
    Request relist_after_expiry();
    Request after_failure(Request::Kind kind, int status, Millis retry_after);
    Millis backoff();
    bool current(uint64_t id) const { return id == id_; }

    SliceStore& store_;
    Options options_;
    ReflectorHooks* hooks_;
    ReflectorHooks no_hooks_;
    uint64_t id_ = 0;
    Request::Kind in_flight_ = Request::Kind::List;
    bool listed_once_ = false;
    bool synced_ = false;
    bool changed_ = false;
    bool watch_after_list_ = false;  // the next watch is the first after a list
    bool watch_saw_events_ = false;
    bool watch_follows_list_ = false;  // the current watch is the first after a list
    int failures_ = 0;
    int expiry_streak_ = 0;  // 410s right after a list, with no event between
    int last_failure_status_ = -1;
    std::string resource_version_;
    std::vector<K8sObject> pending_items_;  // pages of a list in progress
    std::string continue_token_;            // of the list page in flight
    uint64_t rng_state_;
};

}  // namespace stepflow
