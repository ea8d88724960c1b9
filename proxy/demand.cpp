#include "proxy/demand.h"

#include <event2/event.h>

#include "discovery/fleet.h"
#include "proxy/admission.h"
#include "proxy/metrics.h"

namespace stepflow {

Demand measure_demand(const Fleet& fleet) {
    Demand d;
    d.queued = AdmissionQueue::get().depth();
    for (const auto& inst : fleet.instances) {
        int running = std::max(0, inst->capacity.in_use());
        d.in_flight += uint64_t(running);
        if (!inst->takes_new_work()) continue;
        ++d.routable;
        int lim = inst->capacity.limit();
        if (lim > 0) {
            d.slots += uint64_t(lim);
            d.slots_used += uint64_t(std::min(running, lim));
        }
    }
    return d;
}

namespace {

prometheus::Gauge& gauge(const char* name, const char* help) {
    return prometheus::BuildGauge().Name(name).Help(help).Register(Metrics::get().registry()).Add({});
}
prometheus::Counter& counter(const char* name, const char* help) {
    return prometheus::BuildCounter().Name(name).Help(help).Register(Metrics::get().registry()).Add({});
}

}  // namespace

DemandSignal::DemandSignal()
    : cold_start_holds(counter("stepflow_lb_cold_start_holds_total",
                               "New requests that arrived while no instance took new work and were held")),
      cold_start_timeouts(counter("stepflow_lb_cold_start_timeouts_total",
                                  "Held requests answered 503 because no instance became routable in --cold-start-timeout")),
      demand_(gauge("stepflow_lb_demand", "New work waiting in the queue plus new work in flight on instances")),
      in_flight_(gauge("stepflow_lb_new_work_in_flight", "New (unpinned) requests running on instances")),
      slots_(gauge("stepflow_lb_capacity_slots", "Sum of the limits of routable instances that have a limit")),
      slots_used_(gauge("stepflow_lb_capacity_slots_used", "New work running on routable instances that have a limit")) {}

DemandSignal& DemandSignal::get() {
    static DemandSignal* signal = new DemandSignal();  // used by every thread until exit
    return *signal;
}

void DemandSignal::held_on_empty_fleet() {
    cold_start_holds.Increment();
    if (::event* ev = wake_event_.load()) event_active(ev, EV_TIMEOUT, 0);  // thread-safe (evthread_use_pthreads)
}

void DemandSignal::refresh(const Fleet& fleet) {
    Demand d = measure_demand(fleet);
    demand_.Set(double(d.total()));
    in_flight_.Set(double(d.in_flight));
    slots_.Set(double(d.slots));
    slots_used_.Set(double(d.slots_used));
}

void offer_queued_work() {
    if (AdmissionQueue::get().depth() > 0) AdmissionQueue::get().slot_freed();
}

}  // namespace stepflow
