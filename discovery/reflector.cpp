#include "discovery/reflector.h"

#include <algorithm>
#include <random>

namespace stepflow {

Reflector::Reflector(SliceStore& store, Options options, ReflectorHooks* hooks)
    : store_(store), options_(std::move(options)), hooks_(hooks ? hooks : &no_hooks_),
      rng_state_(std::random_device{}()) {
    if (!options_.random) {
        // splitmix64: jitter only needs to spread retries of many balancer pods apart.
        options_.random = [this] {
            uint64_t z = (rng_state_ += 0x9e3779b97f4a7c15ULL);
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            z ^= z >> 31;
            return static_cast<double>(z >> 11) / 9007199254740992.0;
        };
    }
}

Reflector::Request Reflector::start() { return next(Request::Kind::List, "", Millis(0)); }

Reflector::Request Reflector::next(Request::Kind kind, std::string token, Millis delay) {
    ++id_;
    in_flight_ = kind;
    if (kind == Request::Kind::List) {
        if (token.empty()) {
            pending_items_.clear();
            if (synced_) hooks_->relist();
        }
    } else {
        if (!watch_after_list_) hooks_->watch_restart();
        watch_follows_list_ = watch_after_list_;
        watch_after_list_ = false;
        watch_saw_events_ = false;
    }
    continue_token_ = kind == Request::Kind::List ? token : std::string();
    return Request{kind, std::move(token), delay, id_};
}

Reflector::Request Reflector::relist_now() { return next(Request::Kind::List, "", Millis(0)); }

Reflector::Request Reflector::relist_after_expiry() {
    // A version that expires twice in a row before its watch said anything, straight after the
    // list that gave it, means relisting at once does not help (a server stuck behind its own compaction): back
    // off instead of spinning list → 410 → list.
    if (watch_follows_list_ && !watch_saw_events_ && ++expiry_streak_ >= 2) {
        ++failures_;
        return next(Request::Kind::List, "", backoff());
    }
    return relist_now();
}

Reflector::Millis Reflector::backoff() {
    // Exponential in the number of consecutive failures, capped, with "equal jitter": half the
    // step is fixed, half random, so retries never bunch up yet never come too early.
    int64_t step = options_.backoff_base.count();
    for (int i = 1; i < failures_ && step < options_.backoff_cap.count(); ++i) step *= 2;
    step = std::min<int64_t>(step, options_.backoff_cap.count());
    double jittered = static_cast<double>(step) * (0.5 + 0.5 * options_.random());
    return Millis(static_cast<int64_t>(jittered));
}

Reflector::Request Reflector::after_failure(Request::Kind kind, int status, Millis retry_after) {
    // The first 401 is most likely a rotated token that the driver has just re-read: retry at
    // once. Anything else, and a second 401 in a row, backs off.
    bool first_401 = status == 401 && last_failure_status_ != 401;
    last_failure_status_ = status;
    ++failures_;
    Millis delay = first_401 ? Millis(0) : backoff();
    delay = std::max(delay, retry_after);
    return next(kind, kind == Request::Kind::Watch ? resource_version_ : std::string(), delay);
}

std::optional<Reflector::Request> Reflector::list_page(uint64_t id, K8sListPage page) {
    if (!current(id) || in_flight_ != Request::Kind::List) return std::nullopt;
    for (auto& item : page.items) pending_items_.push_back(std::move(item));
    if (!page.continue_token.empty()) return next(Request::Kind::List, std::move(page.continue_token), Millis(0));
    store_.replace(std::move(pending_items_));
    pending_items_.clear();
    resource_version_ = std::move(page.resource_version);
    synced_ = true;
    changed_ = true;
    failures_ = 0;
    last_failure_status_ = -1;
    hooks_->synced();
    watch_after_list_ = true;
    return next(Request::Kind::Watch, resource_version_, Millis(0));
}

std::optional<Reflector::Request> Reflector::list_failed(uint64_t id, int status, Millis retry_after) {
    if (!current(id) || in_flight_ != Request::Kind::List) return std::nullopt;
    hooks_->api_error(status);
    if (status == 410 && !continue_token_.empty()) return relist_now();  // the continue token expired
    return after_failure(Request::Kind::List, status, retry_after);
}

void Reflector::watch_opened(uint64_t id) {
    if (!current(id) || in_flight_ != Request::Kind::Watch) return;
    last_failure_status_ = -1;
}

std::optional<Reflector::Request> Reflector::watch_event(uint64_t id, K8sWatchEvent ev) {
    if (!current(id) || in_flight_ != Request::Kind::Watch) return std::nullopt;
    hooks_->event(ev.type);
    switch (ev.type) {
    case K8sWatchEvent::Type::Error:
        if (ev.error_code == 410) return relist_after_expiry();  // our version is too old: start over
        hooks_->api_error(ev.error_code);
        return after_failure(Request::Kind::Watch, ev.error_code, Millis(0));
    case K8sWatchEvent::Type::Added:
    case K8sWatchEvent::Type::Modified:
        if (!ev.object.resource_version.empty()) resource_version_ = ev.object.resource_version;
        store_.upsert(std::move(ev.object));
        changed_ = true;
        break;
    case K8sWatchEvent::Type::Deleted:
        if (!ev.object.resource_version.empty()) resource_version_ = ev.object.resource_version;
        store_.remove(ev.object.name);
        changed_ = true;
        break;
    case K8sWatchEvent::Type::Bookmark:
        resource_version_ = ev.object.resource_version;
        break;
    }
    watch_saw_events_ = true;
    expiry_streak_ = 0;
    failures_ = 0;
    hooks_->synced();
    return std::nullopt;
}

std::optional<Reflector::Request> Reflector::watch_failed(uint64_t id, int status, Millis retry_after) {
    if (!current(id) || in_flight_ != Request::Kind::Watch) return std::nullopt;
    hooks_->api_error(status);
    if (status == 410) return relist_after_expiry();
    return after_failure(Request::Kind::Watch, status, retry_after);
}

std::optional<Reflector::Request> Reflector::watch_ended(uint64_t id, bool clean) {
    if (!current(id) || in_flight_ != Request::Kind::Watch) return std::nullopt;
    if (watch_saw_events_) {
        failures_ = 0;
        return next(Request::Kind::Watch, resource_version_, Millis(0));
    }
    // A stream that ended before saying anything: the first clean end (timeoutSeconds ran out on
    // a quiet Service) re-watches at once; repeated empty ends back off so a misbehaving server
    // cannot make us spin.
    if (!clean) hooks_->api_error(0);
    ++failures_;
    Millis delay = clean && failures_ == 1 ? Millis(0) : backoff();
    return next(Request::Kind::Watch, resource_version_, delay);
}

std::optional<Reflector::Request> Reflector::watch_garbled(uint64_t id) {
    if (!current(id) || in_flight_ != Request::Kind::Watch) return std::nullopt;
    return relist_now();
}

}  // namespace stepflow
