#include "discovery/fleet.h"

namespace stepflow {

FleetPtr make_fleet(uint64_t version, std::vector<InstancePtr> instances) {
    auto fleet = std::make_shared<Fleet>();
    fleet->version = version;
    fleet->instances = std::move(instances);
    fleet->by_id.reserve(fleet->instances.size());
    for (const auto& inst : fleet->instances) fleet->by_id.emplace(inst->id, inst.get());
    return fleet;
}

}  // namespace stepflow
