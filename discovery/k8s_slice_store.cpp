#include "discovery/k8s_slice_store.h"

#include <set>

#include "core/net.h"

namespace stepflow {
namespace {

// Higher is more useful: when one address appears in two objects (mid-move, or two slices
// briefly disagreeing) the most useful view of it wins.
int rank(const Endpoint& e) {
    if (e.ready && !e.terminating) return 2;
    if (e.serving) return 1;
    return 0;
}

const K8sPort* pick_port(const K8sGroup& group, const PortSelector& sel, const std::string& auto_name) {
    for (const auto& p : group.ports) {
        if (sel.by_name() && p.name == sel.name) return &p;
        if (sel.by_number() && p.port == sel.number) return &p;
        if (!sel.by_name() && !sel.by_number() && p.name == auto_name) return &p;
    }
    return nullptr;
}

}  // namespace

void SliceStore::replace(std::vector<K8sObject> objects) {
    objects_.clear();
    for (auto& o : objects) objects_[o.name] = std::move(o);
}

void SliceStore::upsert(K8sObject object) { objects_[object.name] = std::move(object); }

void SliceStore::remove(const std::string& name) { objects_.erase(name); }

bool SliceStore::endpoints(const PortSelector& sel, std::vector<Endpoint>& out, std::string& error) const {
    out.clear();
    std::string auto_name;
    if (!sel.by_name() && !sel.by_number()) {
        // One Service port may map to different numbers per pod (a named targetPort), so "one
        // port" means one port name across every object.
        std::set<std::string> names;
        std::string listed;
        for (const auto& [_, o] : objects_)
            for (const auto& g : o.groups)
                for (const auto& p : g.ports)
                    if (names.insert(p.name).second)
                        listed += (listed.empty() ? "" : ", ") + (p.name.empty() ? "(unnamed)" : p.name) + ":" +
                                  std::to_string(p.port);
        if (names.size() > 1) {
            error = "the Service's endpoints carry several ports (" + listed +
                    "); choose one with --port-name or --port";
            return false;
        }
        if (!names.empty()) auto_name = *names.begin();
    }
    std::map<std::string, Endpoint> merged;
    for (const auto& [_, o] : objects_) {
        for (const auto& g : o.groups) {
            const K8sPort* port = pick_port(g, sel, auto_name);
            if (!port) continue;
            for (const auto& a : g.addresses) {
                HostPort hp{a.ip, static_cast<uint16_t>(port->port)};
                sockaddr_storage ss;
                socklen_t len;
                if (!numeric_sockaddr(hp, ss, len)) continue;  // not an IP literal: unusable
                Endpoint e{format_sockaddr(reinterpret_cast<sockaddr*>(&ss)), a.pod, a.ready, a.serving,
                           a.terminating};
                auto [it, inserted] = merged.try_emplace(e.address, e);
                if (!inserted && rank(e) > rank(it->second)) it->second = std::move(e);
            }
        }
    }
    out.reserve(merged.size());
    for (auto& [_, e] : merged) out.push_back(std::move(e));
    return true;
}

}  // namespace stepflow
