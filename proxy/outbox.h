// Connections whose output gained bytes during the current callback. Their bytes are written when
// that callback returns (Conn's event handlers call flush()), so a head and the body behind it
// leave in one writev, and a batch of ready sockets does not hold back every response until all
// requests of the batch are read (libevent's deferred buffer callbacks would run only on the
// loop's next turn). Anything queued from elsewhere (a timer, a deferred event) is written by
// the outbox's own event later in the same turn.
#pragma once

#include <vector>

struct event;
struct event_base;

namespace stepflow {

class Conn;
class Timers;

class Outbox {
public:
    explicit Outbox(event_base* base);
    ~Outbox();
    Outbox(const Outbox&) = delete;
    Outbox& operator=(const Outbox&) = delete;

    void add(Conn* conn);     // the caller makes sure it is not queued already
    void remove(Conn* conn);  // a queued connection going away
    void flush();

private:
    static void on_event(int, short, void* arg);

    std::vector<Conn*> pending_;
    event* event_;
    bool scheduled_ = false;
};

// What a connection needs of its thread's loop.
struct Loop {
    event_base* base;
    Timers& timers;
    Outbox& outbox;
};

}  // namespace stepflow
