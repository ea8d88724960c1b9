// Builds the endpoint source that --discovery asks for.
#pragma once

#include <memory>
#include <string>

#include "core/config.h"
#include "discovery/endpoint.h"

struct event_base;

namespace stepflow {

// nullptr with `error` set when the source cannot be set up (bad address, missing credentials).
std::unique_ptr<EndpointSource> make_endpoint_source(const Config& config, event_base* control_base, std::string& error);

}  // namespace stepflow
