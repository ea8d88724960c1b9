// Instances for unit tests: a record at a loopback port, as discovery would make it.
#pragma once

#include <memory>
#include <string>

#include "core/net.h"
#include "discovery/instance.h"

namespace stepflow::testing {

inline InstancePtr instance(const std::string& id, uint16_t port) {
    HostPort hp{"127.0.0.1", port};
    sockaddr_storage ss;
    socklen_t len;
    numeric_sockaddr(hp, ss, len);
    return std::make_shared<Instance>(id, format_host_port(hp.host, hp.port), ss, len, "");
}

}  // namespace stepflow::testing
