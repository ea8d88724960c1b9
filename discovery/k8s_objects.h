// The Kubernetes objects discovery reads, decoded from the API's JSON into plain structs.
// EndpointSlices and v1 Endpoints both become a K8sObject made of "groups" (a set of ports shared
// by a set of addresses), so the store and the reflector never care which API they came from.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace simdjson::dom {
class parser;
}

namespace stepflow {

enum class K8sKind { EndpointSlices, Endpoints };

struct K8sPort {
    std::string name;  // "" for a Service's single unnamed port
    int port = 0;
};

struct K8sAddress {
    std::string ip;   // numeric IPv4 or IPv6, no brackets
    std::string pod;  // targetRef name when it points at a Pod, else ""
    bool ready = true;
    bool serving = true;
    bool terminating = false;
};

struct K8sGroup {
    std::vector<K8sPort> ports;  // TCP ports only
    std::vector<K8sAddress> addresses;
};

struct K8sObject {
    std::string name;
    std::string resource_version;
    std::vector<K8sGroup> groups;
};

struct K8sListPage {
    std::vector<K8sObject> items;
    std::string resource_version;
    std::string continue_token;
};

struct K8sWatchEvent {
    enum class Type { Added, Modified, Deleted, Bookmark, Error };
    Type type = Type::Added;
    K8sObject object;     // for Bookmark only resource_version is set
    int error_code = 0;   // for Error: the Status object's code (410 = expired)
    std::string message;  // for Error
};

const char* to_string(K8sWatchEvent::Type t);

// Each returns false and sets `error` when the text is not what the API sends. `null` lists
// (items, endpoints, ports, subsets, addresses) are read as empty, as the API documents.
bool decode_list(simdjson::dom::parser& parser, std::string_view body, K8sKind kind, K8sListPage& out,
                 std::string& error);
bool decode_watch_event(simdjson::dom::parser& parser, std::string_view line, K8sKind kind, K8sWatchEvent& out,
                        std::string& error);
// A metav1.Status body (what error responses carry): its message, or "" when it is not one.
std::string decode_status_message(simdjson::dom::parser& parser, std::string_view body);

}  // namespace stepflow
