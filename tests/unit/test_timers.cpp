#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include <event2/event.h>

#include "core/timers.h"

using namespace stepflow;

namespace {

struct Loop {
    event_base* base = event_base_new();
    ~Loop() { event_base_free(base); }
};

// An entry that records its name when it fires.
struct Probe {
    std::vector<std::string>* fired;
    std::string name;
    Deadline deadline{[](void* arg) {
                          auto* p = static_cast<Probe*>(arg);
                          p->fired->push_back(p->name);
                      },
                      this};
};

}  // namespace

TEST_CASE("timers: entries fire in deadline order across queues; cancelled ones never fire", "[timers]") {
    Loop loop;
    std::vector<std::string> fired;
    {
        Timers timers(loop.base);
        Probe a{&fired, "a"}, b{&fired, "b"}, c{&fired, "c"}, d{&fired, "d"}, e{&fired, "e"};
        a.deadline.arm(timers, Millis(40));
        b.deadline.arm(timers, Millis(5));
        c.deadline.arm(timers, Millis(5));
        d.deadline.arm(timers, Millis(20));
        e.deadline.arm(timers, Millis(5));
        c.deadline.cancel();
        REQUIRE(a.deadline.armed());
        REQUIRE_FALSE(c.deadline.armed());
        event_base_dispatch(loop.base);  // returns once no event is pending
        REQUIRE(fired == std::vector<std::string>{"b", "e", "d", "a"});
        REQUIRE_FALSE(a.deadline.armed());
    }
}

TEST_CASE("timers: re-arming and restarting move an entry behind the others", "[timers]") {
    Loop loop;
    std::vector<std::string> fired;
    Timers timers(loop.base);
    Probe a{&fired, "a"}, b{&fired, "b"}, c{&fired, "c"};
    a.deadline.arm(timers, Millis(10));
    b.deadline.arm(timers, Millis(10));
    c.deadline.arm(timers, Millis(10));
    a.deadline.restart();                  // a now waits the longest
    b.deadline.arm(timers, Millis(0));     // a zero duration cancels
    REQUIRE_FALSE(b.deadline.armed());
    event_base_dispatch(loop.base);
    REQUIRE(fired == std::vector<std::string>{"c", "a"});
    c.deadline.restart();  // not armed: nothing happens
    REQUIRE_FALSE(c.deadline.armed());
}

TEST_CASE("timers: a callback may cancel or free entries of its own queue", "[timers]") {
    Loop loop;
    std::vector<std::string> fired;
    Timers timers(loop.base);
    auto* victim = new Probe{&fired, "victim"};
    struct Killer {
        Probe** victim;
        std::vector<std::string>* fired;
        Deadline deadline{[](void* arg) {
                              auto* k = static_cast<Killer*>(arg);
                              k->fired->push_back("killer");
                              delete *k->victim;  // its destructor unlinks it
                              *k->victim = nullptr;
                          },
                          this};
    } killer{&victim, &fired};
    killer.deadline.arm(timers, Millis(3));
    victim->deadline.arm(timers, Millis(3));  // due at the same wake-up, behind the killer
    event_base_dispatch(loop.base);
    REQUIRE(fired == std::vector<std::string>{"killer"});
    REQUIRE(victim == nullptr);
}
