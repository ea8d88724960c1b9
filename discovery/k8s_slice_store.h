// The Service's endpoint objects as last seen (every EndpointSlice, or the one v1 Endpoints
// object), and the endpoint set they add up to. Each write replaces one whole object and the set
// is recomputed from all of them, so an endpoint that moves between slices in two writes (added
// to one, then removed from the other) is present once throughout: never lost, never doubled.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "discovery/endpoint.h"
#include "discovery/k8s_objects.h"

namespace stepflow {

// Which port of the objects is the workers' port: by name, by number, or (neither) the one port
// the objects carry.
struct PortSelector {
    std::string name;
    int number = 0;
    bool by_name() const { return !name.empty(); }
    bool by_number() const { return number != 0; }
};

class SliceStore {
public:
    void replace(std::vector<K8sObject> objects);  // a complete list
    void upsert(K8sObject object);                 // ADDED or MODIFIED
    void remove(const std::string& name);          // DELETED
    size_t object_count() const { return objects_.size(); }

    // The deduplicated union, ordered by address. False with `error` set when no port is chosen
    // and the objects carry more than one.
    bool endpoints(const PortSelector& port, std::vector<Endpoint>& out, std::string& error) const;

private:
    std::map<std::string, K8sObject> objects_;  // by name
};

}  // namespace stepflow
