// Socket-address helpers shared by listeners, upstream connections and discovery.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <sys/socket.h>

namespace stepflow {

struct HostPort {
    std::string host;  // without brackets for IPv6
    uint16_t port = 0;
};

// "host:port", "[v6]:port". Port 0 is accepted here (listeners use it to mean "pick one").
bool parse_host_port(const std::string& text, HostPort& out);

// Numeric resolution only (no DNS): IPv4 or IPv6 literal. Used for listeners and for addresses
// discovery already resolved.
bool numeric_sockaddr(const HostPort& hp, sockaddr_storage& out, socklen_t& len);

// Blocking getaddrinfo; only ever called off the event loops (start-up, DNS discovery thread).
bool resolve_all(const HostPort& hp, std::vector<sockaddr_storage>& out, std::string& error);

// "1.2.3.4:80" / "[::1]:80"
std::string format_sockaddr(const sockaddr* sa);
std::string format_host_port(const std::string& host, uint16_t port);

// Non-blocking listening socket with SO_REUSEADDR and, when reuse_port, SO_REUSEPORT so several
// event-loop threads can each accept on their own socket. Returns -1 and sets error on failure.
int open_listener(const sockaddr_storage& addr, socklen_t len, bool reuse_port, std::string& error);

uint16_t sockaddr_port(const sockaddr_storage& addr);

// True for errors that mean this process ran out of something (descriptors, buffers, memory,
// local ports for that destination): such a failure says nothing about the peer and is never
// charged to it.
bool local_resource_error(int err);

}  // namespace stepflow
