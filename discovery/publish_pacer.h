// Runs a rebuild that costs O(fleet) once for a burst of changes instead of once per change.
// The first request after a quiet spell runs it on the next turn of the loop (after whatever
// else that turn brings, e.g. the other watch events of the same read); while requests keep
// coming, runs are spaced by four times the last run's duration (at most 250 ms), so rebuilding
// takes at most about a fifth of the control thread however fast changes arrive.
#pragma once

#include <chrono>
#include <functional>

struct event_base;
struct event;

namespace stepflow {

class PublishPacer {
public:
    PublishPacer(event_base* base, std::function<void()> run);
    ~PublishPacer();
    PublishPacer(const PublishPacer&) = delete;
    PublishPacer& operator=(const PublishPacer&) = delete;

    void request();

private:
    static void on_timer(int, short, void* arg);

    event* timer_;
    std::function<void()> run_;
    bool pending_ = false;
    std::chrono::steady_clock::time_point next_allowed_{};
};

}  // namespace stepflow
