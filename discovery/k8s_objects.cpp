#include "discovery/k8s_objects.h"

#include <simdjson.h>

namespace stepflow {
namespace {

using simdjson::dom::array;
using simdjson::dom::element;
using simdjson::dom::object;

// Field lookups that treat "absent" and "null" alike, since the API omits empty fields
// inconsistently (Go nil slices marshal as null).
bool field(const object& obj, std::string_view key, element& out) {
    if (obj[key].get(out) != simdjson::SUCCESS) return false;
    return !out.is_null();
}

std::string string_field(const object& obj, std::string_view key) {
    element e;
    std::string_view s;
    if (!field(obj, key, e) || e.get(s) != simdjson::SUCCESS) return {};
    return std::string(s);
}

// A list field: true with an empty array when absent or null, false when it has another type.
bool array_field(const object& obj, std::string_view key, array& out, bool& present) {
    element e;
    present = field(obj, key, e);
    if (!present) return true;
    return e.get(out) == simdjson::SUCCESS;
}

bool object_field(const object& obj, std::string_view key, object& out) {
    element e;
    return field(obj, key, e) && e.get(out) == simdjson::SUCCESS;
}

// Optional booleans: `fallback` when absent or null.
bool bool_field(const object& obj, std::string_view key, bool fallback) {
    element e;
    bool b;
    if (!field(obj, key, e) || e.get(b) != simdjson::SUCCESS) return fallback;
    return b;
}

std::string pod_of(const object& obj) {
    object ref;
    if (!object_field(obj, "targetRef", ref)) return {};
    std::string kind = string_field(ref, "kind");
    if (!kind.empty() && kind != "Pod") return {};
    return string_field(ref, "name");
}

bool read_ports(const object& parent, std::vector<K8sPort>& out, std::string& error) {
    array ports;
    bool present;
    if (!array_field(parent, "ports", ports, present)) {
        error = "ports is not a list";
        return false;
    }
    if (!present) return true;
    for (element pe : ports) {
        object p;
        if (pe.get(p) != simdjson::SUCCESS) {
            error = "a port is not an object";
            return false;
        }
        std::string protocol = string_field(p, "protocol");
        if (!protocol.empty() && protocol != "TCP") continue;  // absent means TCP
        element num;
        int64_t n = 0;
        if (!field(p, "port", num) || num.get(n) != simdjson::SUCCESS || n < 1 || n > 65535) continue;
        out.push_back({string_field(p, "name"), static_cast<int>(n)});
    }
    return true;
}

bool read_metadata(const object& obj, K8sObject& out) {
    object meta;
    if (!object_field(obj, "metadata", meta)) return false;
    out.name = string_field(meta, "name");
    out.resource_version = string_field(meta, "resourceVersion");
    return true;
}

bool decode_slice(const object& obj, K8sObject& out, std::string& error) {
    if (!read_metadata(obj, out)) {
        error = "EndpointSlice without metadata";
        return false;
    }
    K8sGroup group;
    if (!read_ports(obj, group.ports, error)) return false;
    std::string address_type = string_field(obj, "addressType");
    array endpoints;
    bool present;
    if (!array_field(obj, "endpoints", endpoints, present)) {
        error = "endpoints is not a list";
        return false;
    }
    // FQDN slices name hosts, not addresses; the data path connects to numeric addresses only.
    bool usable = address_type == "IPv4" || address_type == "IPv6";
    if (present && usable) {
        for (element ee : endpoints) {
            object ep;
            if (ee.get(ep) != simdjson::SUCCESS) {
                error = "an endpoint is not an object";
                return false;
            }
            array addresses;
            bool have;
            std::string_view first;
            // Addresses of one endpoint are fungible (API docs): the first one stands for it.
            if (!array_field(ep, "addresses", addresses, have) || !have || addresses.size() == 0 ||
                addresses.at(0).get(first) != simdjson::SUCCESS)
                continue;
            K8sAddress a;
            a.ip = std::string(first);
            a.pod = pod_of(ep);
            object conditions;
            bool has_conditions = object_field(ep, "conditions", conditions);
            // Absent ready means ready ("unknown state should be interpreted as ready"); absent
            // serving means the same as ready; absent terminating means not terminating.
            a.ready = has_conditions ? bool_field(conditions, "ready", true) : true;
            a.serving = has_conditions ? bool_field(conditions, "serving", a.ready) : a.ready;
            a.terminating = has_conditions ? bool_field(conditions, "terminating", false) : false;
            group.addresses.push_back(std::move(a));
        }
    }
    out.groups.push_back(std::move(group));
    return true;
}

bool read_endpoint_addresses(const object& subset, std::string_view key, bool ready, K8sGroup& group,
                             std::string& error) {
    array addresses;
    bool present;
    if (!array_field(subset, key, addresses, present)) {
        error = std::string(key) + " is not a list";
        return false;
    }
    if (!present) return true;
    for (element ae : addresses) {
        object a;
        if (ae.get(a) != simdjson::SUCCESS) {
            error = "an address is not an object";
            return false;
        }
        std::string ip = string_field(a, "ip");
        if (ip.empty()) continue;
        // v1 Endpoints knows only ready and not ready; terminating pods simply leave.
        group.addresses.push_back({std::move(ip), pod_of(a), ready, ready, false});
    }
    return true;
}

bool decode_endpoints(const object& obj, K8sObject& out, std::string& error) {
    if (!read_metadata(obj, out)) {
        error = "Endpoints without metadata";
        return false;
    }
    array subsets;
    bool present;
    if (!array_field(obj, "subsets", subsets, present)) {
        error = "subsets is not a list";
        return false;
    }
    if (!present) return true;
    for (element se : subsets) {
        object subset;
        if (se.get(subset) != simdjson::SUCCESS) {
            error = "a subset is not an object";
            return false;
        }
        K8sGroup group;
        if (!read_ports(subset, group.ports, error)) return false;
        if (!read_endpoint_addresses(subset, "addresses", true, group, error)) return false;
        if (!read_endpoint_addresses(subset, "notReadyAddresses", false, group, error)) return false;
        out.groups.push_back(std::move(group));
    }
    return true;
}

bool decode_object(const object& obj, K8sKind kind, K8sObject& out, std::string& error) {
    return kind == K8sKind::EndpointSlices ? decode_slice(obj, out, error) : decode_endpoints(obj, out, error);
}

}  // namespace

const char* to_string(K8sWatchEvent::Type t) {
    switch (t) {
    case K8sWatchEvent::Type::Added: return "ADDED";
    case K8sWatchEvent::Type::Modified: return "MODIFIED";
    case K8sWatchEvent::Type::Deleted: return "DELETED";
    case K8sWatchEvent::Type::Bookmark: return "BOOKMARK";
    case K8sWatchEvent::Type::Error: return "ERROR";
    }
    return "UNKNOWN";
}

bool decode_list(simdjson::dom::parser& parser, std::string_view body, K8sKind kind, K8sListPage& out,
                 std::string& error) {
    out = {};
    object root;
    if (parser.parse(body.data(), body.size()).get(root) != simdjson::SUCCESS) {
        error = "list body is not a JSON object";
        return false;
    }
    object meta;
    if (object_field(root, "metadata", meta)) {
        out.resource_version = string_field(meta, "resourceVersion");
        out.continue_token = string_field(meta, "continue");
    }
    if (out.resource_version.empty()) {
        error = "list without metadata.resourceVersion";
        return false;
    }
    array items;
    bool present;
    if (!array_field(root, "items", items, present)) {
        error = "items is not a list";
        return false;
    }
    if (!present) return true;
    for (element ie : items) {
        object item;
        if (ie.get(item) != simdjson::SUCCESS) {
            error = "a list item is not an object";
            return false;
        }
        K8sObject o;
        if (!decode_object(item, kind, o, error)) return false;
        out.items.push_back(std::move(o));
    }
    return true;
}

bool decode_watch_event(simdjson::dom::parser& parser, std::string_view line, K8sKind kind, K8sWatchEvent& out,
                        std::string& error) {
    out = {};
    object root, obj;
    if (parser.parse(line.data(), line.size()).get(root) != simdjson::SUCCESS) {
        error = "watch event is not a JSON object";
        return false;
    }
    std::string type = string_field(root, "type");
    if (!object_field(root, "object", obj)) {
        error = "watch event without an object";
        return false;
    }
    if (type == "ADDED") out.type = K8sWatchEvent::Type::Added;
    else if (type == "MODIFIED") out.type = K8sWatchEvent::Type::Modified;
    else if (type == "DELETED") out.type = K8sWatchEvent::Type::Deleted;
    else if (type == "BOOKMARK") out.type = K8sWatchEvent::Type::Bookmark;
    else if (type == "ERROR") out.type = K8sWatchEvent::Type::Error;
    else {
        error = "unknown watch event type '" + type + "'";
        return false;
    }
    if (out.type == K8sWatchEvent::Type::Error) {
        element code;
        int64_t c = 0;
        if (field(obj, "code", code) && code.get(c) == simdjson::SUCCESS) out.error_code = static_cast<int>(c);
        out.message = string_field(obj, "message");
        return true;
    }
    if (out.type == K8sWatchEvent::Type::Bookmark) {
        // A bookmark carries only metadata.resourceVersion: the point the watch has reached.
        if (!read_metadata(obj, out.object) || out.object.resource_version.empty()) {
            error = "bookmark without a resourceVersion";
            return false;
        }
        return true;
    }
    if (!decode_object(obj, kind, out.object, error)) return false;
    if (out.object.name.empty()) {
        error = "watch event object without a name";
        return false;
    }
    return true;
}

std::string decode_status_message(simdjson::dom::parser& parser, std::string_view body) {
    object root;
    if (parser.parse(body.data(), body.size()).get(root) != simdjson::SUCCESS) return {};
    if (string_field(root, "kind") != "Status") return {};
    return string_field(root, "message");
}

}  // namespace stepflow
