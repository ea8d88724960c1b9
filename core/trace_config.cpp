#include "core/trace_config.h"

#include <cstdlib>

#include <CLI/CLI.hpp>

#include "core/text.h"
#include "core/utf8.h"

namespace stepflow {
namespace {

// "true"/"false" as the OpenTelemetry specification spells booleans, plus on/off and 1/0 as
// our other switches do.
bool parse_bool(const std::string& s, bool& out) {
    std::string l;
    for (char c : s) l += char(std::tolower(static_cast<unsigned char>(c)));
    if (l == "true" || l == "on" || l == "1") { out = true; return true; }
    if (l == "false" || l == "off" || l == "0") { out = false; return true; }
    return false;
}

bool parse_count(const std::string& s, size_t lo, size_t hi, size_t& out) {
    if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos) return false;
    out = size_t(std::stoul(s));
    return out >= lo && out <= hi;
}

// `key=value,key=value` with percent-encoded values (W3C Baggage octets, as the specification
// has OTEL_EXPORTER_OTLP_HEADERS and OTEL_RESOURCE_ATTRIBUTES).
bool parse_pairs(const std::string& s, std::vector<std::pair<std::string, std::string>>& out) {
    size_t start = 0;
    while (start < s.size()) {
        size_t comma = s.find(',', start);
        if (comma == std::string::npos) comma = s.size();
        std::string_view item = trim(std::string_view(s).substr(start, comma - start));
        start = comma + 1;
        if (item.empty()) continue;
        size_t eq = item.find('=');
        if (eq == std::string::npos || eq == 0) return false;
        std::string key(trim(item.substr(0, eq)));
        if (key.empty()) return false;
        out.emplace_back(key, percent_decode(trim(item.substr(eq + 1))));
    }
    return true;
}

}  // namespace

bool parse_otlp_endpoint(const std::string& url, OtlpTarget::Protocol protocol, bool exact_path, OtlpTarget& out,
                         std::string& error) {
    std::string rest;
    if (url.rfind("http://", 0) == 0) {
        out.tls = false;
        rest = url.substr(7);
    } else if (url.rfind("https://", 0) == 0) {
        out.tls = true;
        rest = url.substr(8);
    } else {
        error = "'" + url + "' is not an http:// or https:// URL";
        return false;
    }
    size_t slash = rest.find('/');
    std::string authority = rest.substr(0, slash);
    std::string path = slash == std::string::npos ? "" : rest.substr(slash);
    if (authority.empty()) {
        error = "'" + url + "' names no host";
        return false;
    }
    int default_port = protocol == OtlpTarget::Protocol::Grpc ? 4317 : 4318;
    size_t colon = authority.rfind(':');
    bool bracketed = !authority.empty() && authority.front() == '[';
    if (colon != std::string::npos && (!bracketed || authority[colon - 1] == ']')) {
        std::string port = authority.substr(colon + 1);
        if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
            std::stoi(port) < 1 || std::stoi(port) > 65535) {
            error = "'" + url + "' has no valid port";
            return false;
        }
        out.port = std::stoi(port);
        authority.resize(colon);
    } else {
        out.port = default_port;
    }
    if (bracketed) authority = authority.substr(1, authority.size() - 2);
    if (authority.empty()) {
        error = "'" + url + "' names no host";
        return false;
    }
    out.host = authority;
    out.protocol = protocol;
    if (protocol == OtlpTarget::Protocol::HttpProtobuf) {
        if (exact_path) out.path = path.empty() ? "/" : path;
        else out.path = (path.empty() || path == "/" ? "" : (path.back() == '/' ? path.substr(0, path.size() - 1) : path)) + "/v1/traces";
    }
    return true;
}

namespace {
// An exporter setting as flag and variable, --otel-exporter-otlp-<name> (OTEL_EXPORTER_OTLP_<NAME>),
// and its traces-specific form (-traces-, _TRACES_), which the SDKs use in its place when set.
struct OptionName {
    std::string flag, env;
};
OptionName exporter_option_name(const std::string& name, bool traces) {
    std::string upper = name;
    for (auto& c : upper) c = char(std::toupper(static_cast<unsigned char>(c)));
    if (traces) return {"--otel-exporter-otlp-traces-" + name, "OTEL_EXPORTER_OTLP_TRACES_" + upper};
    return {"--otel-exporter-otlp-" + name, "OTEL_EXPORTER_OTLP_" + upper};
}
void add_exporter_option(CLI::App& app, const std::string& name, std::string& general, std::string& traces,
                         const std::string& help) {
    OptionName g = exporter_option_name(name, false), t = exporter_option_name(name, true);
    app.add_option(g.flag, general, help)->envname(g.env);
    app.add_option(t.flag, traces, "In place of " + g.flag + " when set")->envname(t.env);
}
// The value in force and the name to give in an error.
struct ExporterOption {
    const std::string& value;
    std::string flag, env;
};
ExporterOption exporter_option(const std::string& name, const std::string& general, const std::string& traces) {
    OptionName n = exporter_option_name(name, !traces.empty());
    return {traces.empty() ? general : traces, n.flag, n.env};
}
}  // namespace

void add_trace_flags(CLI::App& app, TraceFlags& f) {
    app.add_option("--trace-enabled", f.trace_enabled,
                   "true|false: make spans and export them over OTLP (default: true when an OTLP endpoint is set)")
        ->envname("STEPFLOW_TRACE_ENABLED");
    app.add_option("--otlp-endpoint", f.stepflow_endpoint, "OTLP/gRPC collector URL, as the Stepflow services take it "
                                                           "(e.g. http://otel-collector:4317)")
        ->envname("STEPFLOW_OTLP_ENDPOINT");
    app.add_option("--otel-exporter-otlp-endpoint", f.endpoint,
                   "OTLP base URL (http/protobuf appends /v1/traces); wins over --otlp-endpoint")
        ->envname("OTEL_EXPORTER_OTLP_ENDPOINT");
    app.add_option("--otel-exporter-otlp-traces-endpoint", f.traces_endpoint, "OTLP traces URL, used as given; wins over both")
        ->envname("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    add_exporter_option(app, "protocol", f.protocol, f.traces_protocol, "grpc|http/protobuf [grpc]");
    add_exporter_option(app, "headers", f.headers, f.traces_headers, "Headers sent with every export: key=value,key=value");
    add_exporter_option(app, "certificate", f.certificate, f.traces_certificate,
                        "PEM CA bundle that verifies an https:// collector (default: the system CA bundle)");
    add_exporter_option(app, "timeout", f.timeout, f.traces_timeout, "Milliseconds one export may take [10000]");
    add_exporter_option(app, "compression", f.compression, f.traces_compression,
                        "none|gzip; gzip is accepted but spans go uncompressed (said at start-up) [none]");
    app.add_option("--otel-service-name", f.service_name, "service.name of the spans [stepflow-lb]")
        ->envname("OTEL_SERVICE_NAME");
    app.add_option("--otel-resource-attributes", f.resource_attributes, "Resource attributes: key=value,key=value")
        ->envname("OTEL_RESOURCE_ATTRIBUTES");
    app.add_option("--otel-traces-sampler", f.sampler,
                   "parentbased_always_on|parentbased_traceidratio|parentbased_always_off|always_on|always_off|"
                   "traceidratio [parentbased_always_on]")
        ->envname("OTEL_TRACES_SAMPLER");
    app.add_option("--otel-traces-sampler-arg", f.sampler_arg, "Ratio 0..1 for the traceidratio samplers [1.0]")
        ->envname("OTEL_TRACES_SAMPLER_ARG");
    app.add_option("--otel-sdk-disabled", f.sdk_disabled, "true: no spans at all, whatever else is set [false]")
        ->envname("OTEL_SDK_DISABLED");
    app.add_option("--otel-bsp-schedule-delay", f.bsp_schedule_delay, "Milliseconds between span exports [5000]")
        ->envname("OTEL_BSP_SCHEDULE_DELAY");
    app.add_option("--otel-bsp-export-timeout", f.bsp_export_timeout,
                   "Milliseconds one export may take, retries excluded (the smaller of this and "
                   "--otel-exporter-otlp-timeout applies) [30000]")
        ->envname("OTEL_BSP_EXPORT_TIMEOUT");
    app.add_option("--otel-bsp-max-queue-size", f.bsp_max_queue_size,
                   "Finished spans waiting for export; beyond, spans are dropped and counted [2048]")
        ->envname("OTEL_BSP_MAX_QUEUE_SIZE");
    app.add_option("--otel-bsp-max-export-batch-size", f.bsp_max_export_batch_size, "Spans per export [512]")
        ->envname("OTEL_BSP_MAX_EXPORT_BATCH_SIZE");
    app.add_option("--metrics-enabled", f.metrics_enabled,
                   "true|false: accepted for the Stepflow services' convention; /metrics is always served [true]")
        ->envname("STEPFLOW_METRICS_ENABLED");
}

std::string finish_trace_flags(const TraceFlags& f, TraceConfig& out) {
    auto bad = [](const std::string& flag, const std::string& env, const std::string& value, const std::string& why) {
        return flag + " (" + env + "): '" + value + "' " + why;
    };
    bool explicit_enabled = false, enabled = false;
    if (!f.trace_enabled.empty()) {
        if (!parse_bool(f.trace_enabled, enabled))
            return bad("--trace-enabled", "STEPFLOW_TRACE_ENABLED", f.trace_enabled, "is not true or false");
        explicit_enabled = true;
    }
    bool disabled = false;
    if (!f.sdk_disabled.empty() && !parse_bool(f.sdk_disabled, disabled))
        return bad("--otel-sdk-disabled", "OTEL_SDK_DISABLED", f.sdk_disabled, "is not true or false");
    if (!f.metrics_enabled.empty() && !parse_bool(f.metrics_enabled, out.metrics_enabled))
        return bad("--metrics-enabled", "STEPFLOW_METRICS_ENABLED", f.metrics_enabled, "is not true or false");

    // A traces-specific setting, when given, is used in place of the general one; errors name it.
    ExporterOption proto = exporter_option("protocol", f.protocol, f.traces_protocol);
    OtlpTarget::Protocol protocol;
    if (proto.value == "grpc") protocol = OtlpTarget::Protocol::Grpc;
    else if (proto.value == "http/protobuf") protocol = OtlpTarget::Protocol::HttpProtobuf;
    else return bad(proto.flag, proto.env, proto.value, "is not grpc or http/protobuf");
    ExporterOption compression = exporter_option("compression", f.compression, f.traces_compression);
    if (compression.value == "gzip") out.compression_asked = true;
    else if (!compression.value.empty() && compression.value != "none")
        return bad(compression.flag, compression.env, compression.value, "is not none or gzip");

    // Every endpoint given is checked, the most specific one used.
    std::string error;
    OtlpTarget target;
    bool any_endpoint = false;
    struct Candidate {
        const std::string& value;
        const char* flag;
        const char* env;
        bool exact;
    } candidates[] = {{f.stepflow_endpoint, "--otlp-endpoint", "STEPFLOW_OTLP_ENDPOINT", false},
                      {f.endpoint, "--otel-exporter-otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", false},
                      {f.traces_endpoint, "--otel-exporter-otlp-traces-endpoint", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", true}};
    for (auto& c : candidates) {
        if (c.value.empty()) continue;
        OtlpTarget t;
        if (!parse_otlp_endpoint(c.value, protocol, c.exact, t, error))
            return std::string(c.flag) + " (" + c.env + "): " + error;
        target = t;
        any_endpoint = true;
    }
    if (!any_endpoint) {
        parse_otlp_endpoint(protocol == OtlpTarget::Protocol::Grpc ? "http://localhost:4317" : "http://localhost:4318",
                            protocol, false, target, error);
    }
    ExporterOption headers = exporter_option("headers", f.headers, f.traces_headers);
    if (!headers.value.empty() && !parse_pairs(headers.value, target.headers))
        return bad(headers.flag, headers.env, headers.value, "is not key=value,key=value");
    for (auto& [k, v] : target.headers)
        for (auto& c : k) c = char(std::tolower(static_cast<unsigned char>(c)));  // HTTP/2 field names are lower case
    target.ca_file = f.traces_certificate.empty() ? f.certificate : f.traces_certificate;

    ExporterSettings& ex = out.exporter;
    size_t n = 0;
    ExporterOption timeout = exporter_option("timeout", f.timeout, f.traces_timeout);
    if (!timeout.value.empty()) {
        if (!parse_count(timeout.value, 1, 600000, n))
            return bad(timeout.flag, timeout.env, timeout.value, "is not milliseconds between 1 and 600000");
        ex.export_timeout = std::chrono::milliseconds(n);
    }
    if (!f.bsp_export_timeout.empty()) {
        if (!parse_count(f.bsp_export_timeout, 1, 600000, n))
            return bad("--otel-bsp-export-timeout", "OTEL_BSP_EXPORT_TIMEOUT", f.bsp_export_timeout, "is not milliseconds between 1 and 600000");
        ex.export_timeout = std::min(ex.export_timeout, std::chrono::milliseconds(n));
    }
    if (!f.bsp_schedule_delay.empty()) {
        if (!parse_count(f.bsp_schedule_delay, 1, 3600000, n))
            return bad("--otel-bsp-schedule-delay", "OTEL_BSP_SCHEDULE_DELAY", f.bsp_schedule_delay, "is not milliseconds between 1 and 3600000");
        ex.schedule_delay = std::chrono::milliseconds(n);
    }
    if (!f.bsp_max_queue_size.empty() && !parse_count(f.bsp_max_queue_size, 1, 10000000, ex.max_queue_size))
        return bad("--otel-bsp-max-queue-size", "OTEL_BSP_MAX_QUEUE_SIZE", f.bsp_max_queue_size, "is not a count between 1 and 10000000");
    if (!f.bsp_max_export_batch_size.empty() &&
        !parse_count(f.bsp_max_export_batch_size, 1, 10000000, ex.max_export_batch_size))
        return bad("--otel-bsp-max-export-batch-size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", f.bsp_max_export_batch_size,
                   "is not a count between 1 and 10000000");
    if (ex.max_export_batch_size > ex.max_queue_size)
        return "--otel-bsp-max-export-batch-size (OTEL_BSP_MAX_EXPORT_BATCH_SIZE) must not exceed "
               "--otel-bsp-max-queue-size (OTEL_BSP_MAX_QUEUE_SIZE)";
    ex.target = target;

    trace::Settings& s = out.sampling;
    if (!f.sampler.empty() && !trace::parse_sampler(f.sampler, s.sampler))
        return bad("--otel-traces-sampler", "OTEL_TRACES_SAMPLER", f.sampler,
                   "is not parentbased_always_on, parentbased_traceidratio, parentbased_always_off, always_on, "
                   "always_off or traceidratio");
    if (!f.sampler_arg.empty()) {
        char* end = nullptr;
        double r = std::strtod(f.sampler_arg.c_str(), &end);
        if (end == f.sampler_arg.c_str() || *end != 0 || !(r >= 0.0 && r <= 1.0))
            return bad("--otel-traces-sampler-arg", "OTEL_TRACES_SAMPLER_ARG", f.sampler_arg, "is not a ratio between 0 and 1");
        s.ratio = r;
    }

    std::vector<std::pair<std::string, std::string>> resource;
    if (!f.resource_attributes.empty() && !parse_pairs(f.resource_attributes, resource))
        return bad("--otel-resource-attributes", "OTEL_RESOURCE_ATTRIBUTES", f.resource_attributes, "is not key=value,key=value");
    // They become protobuf strings, which must be UTF-8: a collector that checks would refuse
    // every export.
    for (auto& [k, v] : resource)
        if (!utf8::valid(k) || !utf8::valid(v))
            return bad("--otel-resource-attributes", "OTEL_RESOURCE_ATTRIBUTES", f.resource_attributes,
                       "has a key or value that is not UTF-8 once percent-decoded");
    if (!utf8::valid(f.service_name))
        return bad("--otel-service-name", "OTEL_SERVICE_NAME", f.service_name, "is not UTF-8");
    // service.name: OTEL_SERVICE_NAME wins over the resource attribute (as in the specification).
    std::string service = "stepflow-lb";
    for (auto& [k, v] : resource)
        if (k == "service.name") service = v;
    if (!f.service_name.empty()) service = f.service_name;
    ex.resource.clear();
    ex.resource.emplace_back("service.name", service);
    for (auto& kv : resource)
        if (kv.first != "service.name") ex.resource.push_back(kv);
    bool has_version = false;
    for (auto& kv : resource) has_version |= kv.first == "service.version";
    if (!has_version) ex.resource.emplace_back("service.version", STEPFLOW_LB_VERSION);

    s.enabled = !disabled && (explicit_enabled ? enabled : any_endpoint);
    return "";
}

}  // namespace stepflow
