#include "discovery/health_probe.h"

#include <cerrno>
#include <cstring>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/ssl.h>
#include <simdjson.h>

#include "core/config.h"
#include "core/net.h"
#include "core/tls.h"

namespace stepflow {
namespace {

constexpr size_t kMaxHealthResponse = 64 * 1024;

}  // namespace

bool valid_instance_id(std::string_view id, std::string& why) {
    if (id.empty()) {
        why = "instanceId is empty";
        return false;
    }
    if (id.size() > 253) {
        why = "instanceId is " + std::to_string(id.size()) + " bytes long (at most 253)";
        return false;
    }
    for (unsigned char c : id) {
        if (c <= 0x20 || c >= 0x7f) {
            why = "instanceId contains a space, control or non-ASCII character";
            return false;
        }
    }
    return true;
}

bool stepflow_instance_id(const HealthResult& result, std::string& id, std::string& why) {
    if (!result.has_instance_id) {
        why = "worker's /health names no instanceId (required in stepflow health mode; not a Stepflow worker? "
              "use --health-check http, tcp or off)";
        return false;
    }
    if (!valid_instance_id(result.instance_id, why)) return false;
    id = result.instance_id;
    return true;
}

HealthResult parse_health_body(int status, std::string_view body) {
    HealthResult r;
    if (status < 200 || status > 299) {
        r.error = "health check answered " + std::to_string(status);
        return r;
    }
    // The DOM parser picks the best SIMD kernel at run time; health bodies are tiny anyway.
    simdjson::dom::parser parser;
    simdjson::dom::object obj;
    if (parser.parse(body.data(), body.size()).get(obj) != simdjson::SUCCESS) {
        r.error = "health body is not a JSON object";
        return r;
    }
    std::string_view health_status, id;
    auto status_field = obj["status"];
    if (status_field.error() != simdjson::NO_SUCH_FIELD) {
        if (status_field.get(health_status) != simdjson::SUCCESS) {
            r.error = "health status is not a string";
            return r;
        }
        if (health_status != "healthy") {
            r.error = "worker reports status '" + std::string(health_status) + "'";
            return r;
        }
    }
    auto id_field = obj["instanceId"];
    if (id_field.error() != simdjson::NO_SUCH_FIELD) {
        if (id_field.get(id) != simdjson::SUCCESS) {
            r.error = "instanceId is not a string";
            return r;
        }
        r.instance_id = std::string(id);
        r.has_instance_id = true;
    }
    // The worker's capacity, when it says: maxConcurrency (Stepflow's example worker), also
    // accepted as max_concurrency or capacity. Anything not a positive integer is ignored.
    for (const char* name : {"maxConcurrency", "max_concurrency", "capacity"}) {
        int64_t n = 0;
        if (obj[name].get(n) == simdjson::SUCCESS && n > 0) {
            r.max_concurrency = int(std::min<int64_t>(n, 1000000));
            break;
        }
    }
    r.healthy = true;
    return r;
}

HealthResult judge_health(HealthCheck mode, int status, std::string_view body) {
    if (mode != HealthCheck::Stepflow) {
        if (status >= 200 && status <= 299) return {true, "", ""};
        return {false, "", "health check answered " + std::to_string(status)};
    }
    HealthResult r = parse_health_body(status, body);
    if (status == 404) r.error += " (no Stepflow /health here? see --health-check and --health-path)";
    bool answered = status >= 200 && status <= 299;
    if (answered && !r.healthy && body.find("\"instanceId\"") == std::string_view::npos) {
        // A 2xx without an id that is not a Stepflow answer either ({"status":"ok"} from nginx,
        // say): most likely not a Stepflow worker at all. Say which flag routes it. (A healthy
        // answer without an id is refused by stepflow_instance_id.)
        r.config_error = true;
        r.error = "health check answered " + std::to_string(status) + " without an instanceId" +
                  (r.error.empty() ? "" : " (" + r.error + ")") +
                  ": not a Stepflow worker? use --health-check http (or tcp, off)";
    }
    return r;
}

HealthProbe::HealthProbe(event_base* base, const sockaddr_storage& addr, socklen_t len, std::string host_header,
                         std::chrono::milliseconds interval, std::chrono::milliseconds timeout, TlsClient* tls,
                         Callback callback)
    : base_(base), addr_(addr), addr_len_(len), host_header_(std::move(host_header)), interval_(interval),
      timeout_(timeout), tls_(tls), callback_(std::move(callback)) {
    tick_ = evtimer_new(base_, on_tick, this);
    deadline_ = evtimer_new(base_, on_deadline, this);
}

HealthProbe::~HealthProbe() {
    close_connection();
    event_free(tick_);
    event_free(deadline_);
}

void HealthProbe::start() {
    timeval now{0, 0};
    evtimer_add(tick_, &now);
}

void HealthProbe::set_interval(std::chrono::milliseconds interval) {
    if (interval == interval_) return;
    bool sooner = interval < interval_;
    interval_ = interval;
    if (!sooner || !evtimer_pending(tick_, nullptr)) return;
    auto due = ticked_at_ + interval - std::chrono::steady_clock::now();
    timeval next = to_timeval(std::max(std::chrono::duration_cast<std::chrono::milliseconds>(due),
                                       std::chrono::milliseconds(0)));
    evtimer_add(tick_, &next);  // re-arms the pending tick; ticked_at_ stays: the cadence is kept
}

void HealthProbe::check_now() {
    timeval now{0, 0};
    evtimer_add(tick_, &now);
}

void HealthProbe::on_tick(int, short, void* arg) { static_cast<HealthProbe*>(arg)->begin_check(); }

void HealthProbe::begin_check() {
    timeval next = to_timeval(interval_);
    evtimer_add(tick_, &next);
    ticked_at_ = std::chrono::steady_clock::now();
    // A check still waiting for its answer is left to finish or time out: dropping it here would
    // re-arm its deadline every tick, and a worker that never answers would never fail.
    if (in_flight()) return;
    timeval deadline = to_timeval(timeout_);
    evtimer_add(deadline_, &deadline);

    SSL* ssl = nullptr;
    if (tls_) {
        std::string host = host_header_.substr(0, host_header_.rfind(':'));
        if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
        ssl = tls_->new_connection(host);
        if (!ssl) return complete({false, "", "cannot create a TLS connection", true});
        bev_ = bufferevent_openssl_socket_new(base_, -1, ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
    } else {
        bev_ = bufferevent_socket_new(base_, -1, BEV_OPT_CLOSE_ON_FREE);
    }
    if (!bev_) return complete({false, "", "cannot create a connection object", true});
    bufferevent_setcb(bev_, on_read, nullptr, on_event, this);
    scan_from_ = 0;
    head_parsed_ = false;
    body_ = evbuffer_new();
    if (mode_ == HealthCheck::Tcp) {
        bufferevent_enable(bev_, EV_READ);
        if (bufferevent_socket_connect(bev_, reinterpret_cast<const sockaddr*>(&addr_), static_cast<int>(addr_len_)) != 0)
            complete({false, "", "connect failed"});
        return;
    }
    std::string req = "GET " + path_ + " HTTP/1.1\r\nHost: " + host_header_ +
                      "\r\nUser-Agent: stepflow-lb\r\nAccept: application/json\r\nConnection: close\r\n\r\n";
    bufferevent_write(bev_, req.data(), req.size());
    bufferevent_enable(bev_, EV_READ | EV_WRITE);
    errno = 0;
    if (bufferevent_socket_connect(bev_, reinterpret_cast<const sockaddr*>(&addr_), static_cast<int>(addr_len_)) != 0) {
        // Failing at once means no socket could be made (a refused connect is reported later).
        int err = errno;
        if (local_resource_error(err))
            return complete({false, "", std::string("cannot create a socket: ") + std::strerror(err), true});
        complete({false, "", "connect failed"});
    }
}

void HealthProbe::on_deadline(int, short, void* arg) {
    static_cast<HealthProbe*>(arg)->complete({false, "", "health check timed out"});
}

void HealthProbe::on_read(bufferevent*, void* arg) { static_cast<HealthProbe*>(arg)->try_parse(false); }

void HealthProbe::on_event(bufferevent*, short what, void* arg) {
    auto* self = static_cast<HealthProbe*>(arg);
    if (what & BEV_EVENT_CONNECTED) {
        if (self->mode_ == HealthCheck::Tcp) self->complete({true, "", ""});
        return;
    }
    if (what & BEV_EVENT_EOF) {
        self->try_parse(true);
        return;
    }
    int error = EVUTIL_SOCKET_ERROR();
    const char* why = self->head_parsed_ ? "connection reset" : "connect failed";
    if (self->tls_ && !self->head_parsed_) why = "connect or TLS handshake failed";
    HealthResult result{false, "", why};
    result.refused = !self->head_parsed_ && error == ECONNREFUSED;
    self->complete(result);
}

void HealthProbe::try_parse(bool eof) {
    if (!bev_) return;
    evbuffer* in = bufferevent_get_input(bev_);
    if (!head_parsed_) {
        size_t n = http1::find_head_end(in, kMaxHealthResponse, scan_from_);
        if (n == SIZE_MAX) return complete({false, "", "health response head too large"});
        if (n == 0) {
            if (eof) complete({false, "", "connection closed before a response"});
            return;
        }
        head_ = http1::Head{};
        head_.raw.resize(n);
        evbuffer_remove(in, head_.raw.data(), n);
        if (auto err = http1::parse_response(head_, false)) return complete({false, "", err.reason});
        if (head_.status < 200) {  // skip interim responses
            scan_from_ = 0;
            return try_parse(eof);
        }
        head_parsed_ = true;
        body_pump_.start(head_.framing, head_.content_length, false);
    }
    auto status = body_pump_.pump(in, body_);
    if (status == http1::BodyPump::Status::Error) return complete({false, "", body_pump_.error()});
    if (evbuffer_get_length(body_) > kMaxHealthResponse) return complete({false, "", "health body too large"});
    if (status == http1::BodyPump::Status::More && eof) {
        if (!body_pump_.until_close()) return complete({false, "", "health response truncated"});
        body_pump_.finish_on_close(body_);
        status = http1::BodyPump::Status::Done;
    }
    if (status != http1::BodyPump::Status::Done) return;
    size_t len = evbuffer_get_length(body_);
    std::string_view body(reinterpret_cast<const char*>(evbuffer_pullup(body_, -1)), len);
    complete(judge_health(mode_, head_.status, body));
}

void HealthProbe::complete(HealthResult result) {
    close_connection();
    evtimer_del(deadline_);
    callback_(result);  // last: the callback may destroy this probe
}

void HealthProbe::close_connection() {
    if (bev_) {
        bufferevent_free(bev_);
        bev_ = nullptr;
    }
    if (body_) {
        evbuffer_free(body_);
        body_ = nullptr;
    }
}

}  // namespace stepflow
