#include "discovery/publish_pacer.h"

#include <algorithm>

#include <event2/event.h>

namespace stepflow {
namespace {

constexpr int kSpacingFactor = 4;
constexpr std::chrono::milliseconds kMaxSpacing{250};

}  // namespace

PublishPacer::PublishPacer(event_base* base, std::function<void()> run)
    : timer_(evtimer_new(base, on_timer, this)), run_(std::move(run)) {}

PublishPacer::~PublishPacer() { event_free(timer_); }

void PublishPacer::request() {
    if (pending_) return;
    pending_ = true;
    auto wait = std::max(next_allowed_ - std::chrono::steady_clock::now(), std::chrono::steady_clock::duration::zero());
    auto us = std::chrono::duration_cast<std::chrono::microseconds>(wait).count();
    timeval tv{static_cast<time_t>(us / 1000000), static_cast<suseconds_t>(us % 1000000)};
    evtimer_add(timer_, &tv);
}

void PublishPacer::on_timer(int, short, void* arg) {
    auto* self = static_cast<PublishPacer*>(arg);
    self->pending_ = false;
    auto start = std::chrono::steady_clock::now();
    self->run_();
    auto end = std::chrono::steady_clock::now();
    auto spacing = std::min<std::chrono::steady_clock::duration>((end - start) * kSpacingFactor, kMaxSpacing);
    self->next_allowed_ = end + spacing;
}

}  // namespace stepflow
