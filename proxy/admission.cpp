#include "proxy/admission.h"

#include <algorithm>

#include "core/text.h"
#include "proxy/metrics.h"
#include "proxy/loop_thread.h"

namespace stepflow {

int load_report_capacity(std::string_view v) {
    v = trim(v);
    if (v.size() < 5 || !(v.substr(0, 4) == "TEXT" || v.substr(0, 4) == "text") || (v[4] != ' ' && v[4] != '\t')) return 0;
    v.remove_prefix(5);
    while (!v.empty()) {
        size_t comma = v.find(',');
        std::string_view item = trim(v.substr(0, comma));
        v = comma == std::string_view::npos ? std::string_view() : v.substr(comma + 1);
        size_t sep = item.find_first_of("=:");
        if (sep == std::string_view::npos) continue;
        if (trim(item.substr(0, sep)) != "named_metrics.capacity") continue;
        std::string_view num = trim(item.substr(sep + 1));
        int64_t n = 0;
        size_t digits = 0;
        while (digits < num.size() && num[digits] >= '0' && num[digits] <= '9' && n < 1000000)
            n = n * 10 + (num[digits++] - '0');
        // "4" or "4.0" (ORCA values are doubles); anything else is ignored.
        if (digits == 0 || n <= 0 || n >= 1000000) return 0;
        std::string_view rest = num.substr(digits);  // "4.0": ORCA values are doubles
        if (!rest.empty() && (rest[0] != '.' || rest.find_first_not_of("0123456789", 1) != std::string_view::npos))
            return 0;
        return int(n);
    }
    return 0;
}

AdmissionQueue& AdmissionQueue::get() {
    static AdmissionQueue* queue = new AdmissionQueue();  // lives as long as the threads using it
    return *queue;
}

uint64_t AdmissionQueue::next_ticket() {
    static std::atomic<uint64_t> next{1};
    return next.fetch_add(1, std::memory_order_relaxed);
}

bool AdmissionQueue::push(LoopThread* thread, uint64_t ticket) {
    std::lock_guard lock(mutex_);
    if (entries_.size() >= capacity_) return false;
    entries_.push_back({thread, ticket, false});
    depth_.store(entries_.size(), std::memory_order_relaxed);
    Metrics::get().queue_depth.Set(double(entries_.size()));
    return true;
}

void AdmissionQueue::push_front(LoopThread* thread, uint64_t ticket, bool retries_spent) {
    std::lock_guard lock(mutex_);
    entries_.push_front({thread, ticket, retries_spent});  // it held a place already: never refused
    depth_.store(entries_.size(), std::memory_order_relaxed);
    Metrics::get().queue_depth.Set(double(entries_.size()));
}

bool AdmissionQueue::remove(uint64_t ticket) {
    std::lock_guard lock(mutex_);
    auto it = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.ticket == ticket; });
    if (it == entries_.end()) return false;
    entries_.erase(it);
    depth_.store(entries_.size(), std::memory_order_relaxed);
    Metrics::get().queue_depth.Set(double(entries_.size()));
    return true;
}

void AdmissionQueue::slot_freed() {
    if (depth() == 0) return;
    Entry e;
    {
        std::lock_guard lock(mutex_);
        if (entries_.empty()) return;
        e = entries_.front();
        entries_.pop_front();
        depth_.store(entries_.size(), std::memory_order_relaxed);
        Metrics::get().queue_depth.Set(double(entries_.size()));
    }
    e.thread->admit(e.ticket);
}

void AdmissionQueue::pass_on() {
    if (depth() == 0) return;
    Entry e;
    {
        std::lock_guard lock(mutex_);
        auto it = std::find_if(entries_.begin(), entries_.end(), [](const Entry& x) { return !x.retries_spent; });
        if (it == entries_.end()) return;
        e = *it;
        entries_.erase(it);
        depth_.store(entries_.size(), std::memory_order_relaxed);
        Metrics::get().queue_depth.Set(double(entries_.size()));
    }
    e.thread->admit(e.ticket);
}

}  // namespace stepflow
