#include "discovery/static_source.h"

#include "core/net.h"

namespace stepflow {

bool StaticSource::resolve(const std::vector<std::string>& backends, std::vector<Endpoint>& out, std::string& error) {
    out.clear();
    for (const auto& text : backends) {
        HostPort hp;
        if (!parse_host_port(text, hp)) {
            error = "'" + text + "' is not host:port";
            return false;
        }
        sockaddr_storage ss;
        socklen_t len;
        if (numeric_sockaddr(hp, ss, len)) {
            out.push_back({format_sockaddr(reinterpret_cast<sockaddr*>(&ss)), "", true, true, false});
            continue;
        }
        std::vector<sockaddr_storage> addrs;
        std::string why;
        if (!resolve_all(hp, addrs, why) || addrs.empty()) {
            error = "cannot resolve '" + text + "': " + why;
            return false;
        }
        // A name stands for one backend: its first address.
        out.push_back({format_sockaddr(reinterpret_cast<sockaddr*>(&addrs.front())), "", true, true, false});
    }
    return true;
}

}  // namespace stepflow
