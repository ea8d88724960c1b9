#include "discovery/api_connections.h"

#include <algorithm>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "core/config.h"

namespace stepflow {

ApiConnections::~ApiConnections() {
    for (bufferevent* bev : idle_) bufferevent_free(bev);
}

bufferevent* ApiConnections::take() {
    if (idle_.empty()) return nullptr;
    bufferevent* bev = idle_.back();
    idle_.pop_back();
    bufferevent_setcb(bev, nullptr, nullptr, nullptr, nullptr);
    bufferevent_set_timeouts(bev, nullptr, nullptr);
    return bev;
}

void ApiConnections::give(bufferevent* bev) {
    // One call is in flight at a time, so one idle connection is all that can be reused.
    while (!idle_.empty()) drop(idle_.front());
    bufferevent_setcb(bev, on_idle_read, nullptr, on_idle_event, this);
    // Close it ourselves before a server's idle timeout would, so reuse rarely races a close.
    timeval tv = to_timeval(max_idle_);
    bufferevent_set_timeouts(bev, &tv, nullptr);
    bufferevent_enable(bev, EV_READ);
    idle_.push_back(bev);
}

// Nothing is owed on an idle connection: bytes arriving mean the stream is out of step.
void ApiConnections::on_idle_read(bufferevent* bev, void* arg) { static_cast<ApiConnections*>(arg)->drop(bev); }

void ApiConnections::on_idle_event(bufferevent* bev, short, void* arg) { static_cast<ApiConnections*>(arg)->drop(bev); }

void ApiConnections::drop(bufferevent* bev) {
    idle_.erase(std::remove(idle_.begin(), idle_.end(), bev), idle_.end());
    bufferevent_free(bev);
}

}  // namespace stepflow
