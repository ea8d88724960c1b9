#include "proxy/outbox.h"

#include <algorithm>

#include <event2/event.h>

#include "proxy/conn.h"

namespace stepflow {

Outbox::Outbox(event_base* base) : event_(event_new(base, -1, 0, on_event, this)) {}

Outbox::~Outbox() { event_free(event_); }

void Outbox::add(Conn* conn) {
    pending_.push_back(conn);
    if (!scheduled_) {
        event_active(event_, 0, 0);
        scheduled_ = true;
    }
}

void Outbox::remove(Conn* conn) {
    auto it = std::find(pending_.begin(), pending_.end(), conn);
    if (it != pending_.end()) pending_.erase(it);
}

// A write can fail and report to its owner, which may free other queued connections (they leave
// the list as they go) or queue new output: take one at a time from the back.
void Outbox::flush() {
    while (!pending_.empty()) {
        Conn* conn = pending_.back();
        pending_.pop_back();
        conn->send_queued();
    }
}

void Outbox::on_event(int, short, void* arg) {
    auto* self = static_cast<Outbox*>(arg);
    self->scheduled_ = false;
    self->flush();
}

}  // namespace stepflow
