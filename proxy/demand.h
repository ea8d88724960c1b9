// Demand on the worker fleet as this balancer sees it: new work waiting in the admission queue
// plus new work running on instances. An autoscaler sizes the fleet on it (docs/autoscaling.md);
// the KEDA external scaler (proxy/scaler_service.h) answers with it, summed over replicas.
#pragma once

#include <atomic>
#include <cstdint>

#include <prometheus/counter.h>
#include <prometheus/gauge.h>

struct event;

namespace stepflow {

struct Fleet;

struct Demand {
    uint64_t queued = 0;      // new work waiting for an instance
    uint64_t in_flight = 0;   // new (unpinned) work running on instances
    uint64_t slots = 0;       // sum of the limits of routable instances that have one
    uint64_t slots_used = 0;  // new work running on those instances
    uint64_t routable = 0;    // instances taking new work
    uint64_t total() const { return queued + in_flight; }
};

// Reads the queue and the instances' counters (any thread; a few atomics per instance).
Demand measure_demand(const Fleet& fleet);

// The process-wide wake-up line between the data path and the scaler: a request that starts
// waiting while no instance is routable must reach KEDA at once, not at its next poll.
class DemandSignal {
public:
    static DemandSignal& get();

    // Data path, any thread: new work is held because no instance takes it (cold start).
    void held_on_empty_fleet();
    // The control loop's event that held_on_empty_fleet() activates (the scaler's wake-up).
    void attach_event(::event* ev) { wake_event_.store(ev); }

    // Refreshes the demand gauges before a scrape.
    void refresh(const Fleet& fleet);

    prometheus::Counter& cold_start_holds;
    prometheus::Counter& cold_start_timeouts;

private:
    DemandSignal();
    std::atomic<::event*> wake_event_{nullptr};
    prometheus::Gauge& demand_;
    prometheus::Gauge& in_flight_;
    prometheus::Gauge& slots_;
    prometheus::Gauge& slots_used_;
};

// Hands the oldest queued request a chance at the fleet: called when an instance becomes routable
// (first health check, recovery, endpoint ready), so held work leaves at once rather than at the
// next admission tick. Each dispatched request passes the turn on while room remains.
void offer_queued_work();

}  // namespace stepflow
