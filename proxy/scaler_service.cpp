#include "proxy/scaler_service.h"

#include <cstring>
#include <vector>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <nghttp2/nghttp2.h>

#include "core/config.h"
#include "core/log.h"
#include "discovery/fleet_manager.h"
#include "proxy/demand.h"
#include "proxy/peers.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wshadow"
#pragma GCC diagnostic ignored "-Wold-style-cast"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wnull-dereference"
#include "externalscaler.pb.h"
#pragma GCC diagnostic pop

namespace stepflow {
namespace {

constexpr size_t kMaxMessage = 64 * 1024;  // a ScaledObjectRef is a few hundred bytes
constexpr timeval kTick{1, 0};             // StreamIsActive: re-evaluated once a second

// gRPC's length-prefixed message: one flag byte (0: not compressed), a 4-byte big-endian length.
std::string frame(const google::protobuf::MessageLite& message) {
    std::string body = message.SerializeAsString();
    std::string out(5, '\0');
    uint32_t n = uint32_t(body.size());
    out[1] = char(n >> 24);
    out[2] = char(n >> 16);
    out[3] = char(n >> 8);
    out[4] = char(n);
    return out + body;
}

bool unframe(const std::string& data, google::protobuf::MessageLite& message) {
    if (data.size() < 5 || data[0] != 0) return false;
    uint32_t n = uint32_t(uint8_t(data[1])) << 24 | uint32_t(uint8_t(data[2])) << 16 |
                 uint32_t(uint8_t(data[3])) << 8 | uint32_t(uint8_t(data[4]));
    if (data.size() - 5 != n) return false;
    return message.ParseFromArray(data.data() + 5, int(n));
}

nghttp2_nv header(const char* name, const std::string& value) {
    return {reinterpret_cast<uint8_t*>(const_cast<char*>(name)),
            reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), std::strlen(name), value.size(),
            NGHTTP2_NV_FLAG_NONE};
}

}  // namespace

struct ScalerService::Connection : std::enable_shared_from_this<Connection> {
    struct Stream {
        std::string path;
        std::string body;
        std::string out;        // framed messages not yet taken by nghttp2
        bool finish = false;    // trailers after `out`
        std::string status = "0";
        std::string message;
        bool responded = false;
        bool watching = false;  // StreamIsActive
        int sent = -1;          // its last answer (0/1), -1 before the first
    };

    ScalerService& service;
    bufferevent* bev;
    nghttp2_session* session = nullptr;
    std::map<int32_t, Stream> streams;
    bool closed = false;
    bool in_recv = false;  // nghttp2 forbids sending from inside its callbacks

    Connection(ScalerService& s, bufferevent* b) : service(s), bev(b) {}
    ~Connection() {
        if (session) nghttp2_session_del(session);
        if (bev) bufferevent_free(bev);
    }

    void start() {
        nghttp2_session_callbacks* cb;
        nghttp2_session_callbacks_new(&cb);
        nghttp2_session_callbacks_set_on_begin_headers_callback(cb, [](nghttp2_session*, const nghttp2_frame* f, void* u) {
            static_cast<Connection*>(u)->streams[f->hd.stream_id];
            return 0;
        });
        nghttp2_session_callbacks_set_on_header_callback(
            cb, [](nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen, const uint8_t* value,
                   size_t valuelen, uint8_t, void* u) {
                auto* c = static_cast<Connection*>(u);
                auto it = c->streams.find(f->hd.stream_id);
                if (it != c->streams.end() && std::string_view(reinterpret_cast<const char*>(name), namelen) == ":path")
                    it->second.path.assign(reinterpret_cast<const char*>(value), valuelen);
                return 0;
            });
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(
            cb, [](nghttp2_session*, uint8_t, int32_t id, const uint8_t* data, size_t len, void* u) {
                auto* c = static_cast<Connection*>(u);
                auto it = c->streams.find(id);
                if (it == c->streams.end()) return 0;
                if (it->second.body.size() + len > kMaxMessage) return int(NGHTTP2_ERR_CALLBACK_FAILURE);
                it->second.body.append(reinterpret_cast<const char*>(data), len);
                return 0;
            });
        nghttp2_session_callbacks_set_on_frame_recv_callback(cb, [](nghttp2_session*, const nghttp2_frame* f, void* u) {
            auto* c = static_cast<Connection*>(u);
            if ((f->hd.type == NGHTTP2_HEADERS || f->hd.type == NGHTTP2_DATA) && (f->hd.flags & NGHTTP2_FLAG_END_STREAM))
                c->handle(f->hd.stream_id);
            return 0;
        });
        nghttp2_session_callbacks_set_on_stream_close_callback(cb, [](nghttp2_session*, int32_t id, uint32_t, void* u) {
            static_cast<Connection*>(u)->streams.erase(id);
            return 0;
        });
        nghttp2_session_server_new(&session, cb, this);
        nghttp2_session_callbacks_del(cb);
        nghttp2_settings_entry settings[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100}};
        nghttp2_submit_settings(session, NGHTTP2_FLAG_NONE, settings, 1);
        flush();
    }

    // Reads what arrived; false when the connection is done.
    bool read() {
        evbuffer* in = bufferevent_get_input(bev);
        while (size_t len = evbuffer_get_length(in)) {
            auto* data = evbuffer_pullup(in, ssize_t(std::min<size_t>(len, 16384)));
            in_recv = true;
            ssize_t n = nghttp2_session_mem_recv(session, data, std::min<size_t>(len, 16384));
            in_recv = false;
            if (n < 0) return false;
            evbuffer_drain(in, size_t(n));
        }
        return flush();
    }

    bool flush() {
        if (in_recv) return true;  // read() flushes once nghttp2 returns
        while (true) {
            const uint8_t* data;
            ssize_t n = nghttp2_session_mem_send(session, &data);
            if (n < 0) return false;
            if (n == 0) break;
            bufferevent_write(bev, data, size_t(n));
        }
        return nghttp2_session_want_read(session) || nghttp2_session_want_write(session) ||
               evbuffer_get_length(bufferevent_get_output(bev)) > 0;
    }

    static ssize_t read_data(nghttp2_session* s, int32_t id, uint8_t* buf, size_t length, uint32_t* flags,
                             nghttp2_data_source*, void* u) {
        auto* c = static_cast<Connection*>(u);
        auto it = c->streams.find(id);
        if (it == c->streams.end()) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        Stream& st = it->second;
        size_t n = std::min(length, st.out.size());
        std::memcpy(buf, st.out.data(), n);
        st.out.erase(0, n);
        if (st.out.empty()) {
            if (!st.finish) return n > 0 ? ssize_t(n) : ssize_t(NGHTTP2_ERR_DEFERRED);
            *flags |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
            nghttp2_nv trailers[] = {header("grpc-status", st.status), header("grpc-message", st.message)};
            nghttp2_submit_trailer(s, id, trailers, st.message.empty() ? 1 : 2);
        }
        return ssize_t(n);
    }

    // Response head (and the body provider) of stream `id`.
    void respond(int32_t id) {
        Stream& st = streams[id];
        if (st.responded) return;
        st.responded = true;
        static const std::string ok = "200", type = "application/grpc";
        nghttp2_nv head[] = {header(":status", ok), header("content-type", type)};
        nghttp2_data_provider provider{};
        provider.read_callback = read_data;
        nghttp2_submit_response(session, id, head, 2, &provider);
    }

    void send(int32_t id, const std::string& framed, bool last, std::string status = "0", std::string message = {}) {
        auto it = streams.find(id);
        if (it == streams.end()) return;
        it->second.out += framed;
        if (last) {
            it->second.finish = true;
            it->second.status = std::move(status);
            it->second.message = std::move(message);
        }
        if (!it->second.responded) respond(id);
        else nghttp2_session_resume_data(session, id);
        flush();
    }

    void handle(int32_t id);
};

void ScalerService::Connection::handle(int32_t id) {
    Stream& st = streams[id];
    const std::string prefix = "/externalscaler.ExternalScaler/";
    std::string method = st.path.rfind(prefix, 0) == 0 ? st.path.substr(prefix.size()) : std::string();
    externalscaler::ScaledObjectRef ref;
    externalscaler::GetMetricsRequest metrics_request;
    bool parsed = method == "GetMetrics" ? unframe(st.body, metrics_request) : unframe(st.body, ref);
    if (method != "IsActive" && method != "StreamIsActive" && method != "GetMetricSpec" && method != "GetMetrics")
        return send(id, {}, true, "12", "unknown method " + st.path);  // UNIMPLEMENTED (StreamMetricSpec too)
    if (!parsed) return send(id, {}, true, "3", "malformed request message");  // INVALID_ARGUMENT

    if (method == "GetMetricSpec") {
        // The demand one worker replica is meant to carry: KEDA divides the total by it.
        int64_t target = service.config_.max_in_flight_per_instance > 0 ? service.config_.max_in_flight_per_instance : 1;
        auto meta = ref.scalermetadata().find("targetDemand");
        if (meta != ref.scalermetadata().end()) {
            char* end = nullptr;
            long long v = std::strtoll(meta->second.c_str(), &end, 10);
            if (end && *end == '\0' && v > 0) target = v;
        }
        externalscaler::GetMetricSpecResponse out;
        auto* spec = out.add_metricspecs();
        spec->set_metricname("stepflow_lb_demand");
        spec->set_targetsize(target);
        spec->set_targetsizefloat(double(target));
        return send(id, frame(out), true);
    }
    if (method == "StreamIsActive") {
        st.watching = true;
        bool active = service.local_demand() > 0;
        st.sent = active;  // peers' demand, if any, follows at the next tick
        externalscaler::IsActiveResponse out;
        out.set_result(active);
        return send(id, frame(out), false);  // first answer now, then on every change
    }
    std::string metric_name = metrics_request.metricname().empty() ? "stepflow_lb_demand" : metrics_request.metricname();
    std::weak_ptr<Connection> weak = shared_from_this();
    service.total_demand([weak, id, method, metric_name](uint64_t demand, size_t, size_t) {
        auto self = weak.lock();
        if (!self || self->closed || !self->streams.count(id)) return;
        if (method == "IsActive") {
            externalscaler::IsActiveResponse out;
            out.set_result(demand > 0);
            return self->send(id, frame(out), true);
        }
        externalscaler::GetMetricsResponse out;
        auto* value = out.add_metricvalues();
        value->set_metricname(metric_name);
        value->set_metricvalue(int64_t(demand));
        value->set_metricvaluefloat(double(demand));
        self->send(id, frame(out), true);
    });
}

ScalerService::ScalerService(event_base* base, int listen_fd, FleetManager& fleet, Peers& peers, const Config& config)
    : base_(base), fleet_(fleet), peers_(peers), config_(config) {
    listener_ = evconnlistener_new(base, on_accept, this, LEV_OPT_CLOSE_ON_FREE, 0, listen_fd);
    wake_ = event_new(base, -1, 0, on_wake, this);
    DemandSignal::get().attach_event(wake_);
    tick_ = event_new(base, -1, EV_PERSIST, on_tick, this);
    event_add(tick_, &kTick);
}

ScalerService::~ScalerService() {
    DemandSignal::get().attach_event(nullptr);
    if (listener_) evconnlistener_free(listener_);
    for (auto& c : connections_) c->closed = true;
    connections_.clear();
    event_free(wake_);
    event_free(tick_);
}

uint64_t ScalerService::local_demand() const { return measure_demand(*fleet_.fleet()).total(); }

void ScalerService::total_demand(std::function<void(uint64_t, size_t, size_t)> done) {
    uint64_t local = local_demand();
    peers_.poll([this, local, done = std::move(done)](Peers::Sum sum) {
        if (sum.reached != last_reached_) {
            log::info("scaler: demand summed over replicas",
                      {{"peers", uint64_t(sum.asked)}, {"peers_reached", uint64_t(sum.reached)},
                       {"demand", local + sum.demand}});
            last_reached_ = sum.reached;
        } else {
            log::debug("scaler: demand summed over replicas",
                       {{"peers", uint64_t(sum.asked)}, {"peers_reached", uint64_t(sum.reached)},
                        {"demand", local + sum.demand}});
        }
        done(local + sum.demand, sum.asked, sum.reached);
    });
}

void ScalerService::push_active(bool active) {
    externalscaler::IsActiveResponse out;
    out.set_result(active);
    std::string framed = frame(out);
    // Ids first: sending may close other streams of the connection (nghttp2 callbacks erase them).
    std::vector<std::pair<std::shared_ptr<Connection>, int32_t>> watchers;
    for (const auto& c : connections_)
        for (auto& [id, st] : c->streams)
            if (st.watching && st.sent != int(active)) {
                st.sent = active;
                watchers.emplace_back(c, id);
            }
    for (auto& [c, id] : watchers)
        if (!c->closed) c->send(id, framed, false);
}

// A request was just held on an empty fleet: tell KEDA now (wakes a Deployment at zero).
void ScalerService::on_wake(int, short, void* arg) {
    auto* self = static_cast<ScalerService*>(arg);
    self->push_active(true);
}

void ScalerService::on_tick(int, short, void* arg) {
    auto* self = static_cast<ScalerService*>(arg);
    bool watched = false;
    for (const auto& c : self->connections_)
        for (auto& [id, st] : c->streams) watched = watched || st.watching;
    if (!watched || self->polling_) return;
    if (self->local_demand() > 0) return self->push_active(true);  // no need to ask the peers
    self->polling_ = true;
    self->total_demand([self](uint64_t demand, size_t, size_t) {
        self->polling_ = false;
        self->push_active(demand > 0);
    });
}

void ScalerService::on_accept(evconnlistener* listener, int fd, sockaddr*, int, void* arg) {
    auto* self = static_cast<ScalerService*>(arg);
    auto* bev = bufferevent_socket_new(evconnlistener_get_base(listener), fd, BEV_OPT_CLOSE_ON_FREE);
    auto fresh = std::make_shared<Connection>(*self, bev);
    self->connections_.insert(fresh);
    Connection* raw = fresh.get();
    bufferevent_setcb(
        bev,
        [](bufferevent*, void* c) {
            auto* conn = static_cast<Connection*>(c);
            if (!conn->read()) {
                conn->closed = true;
                conn->service.connections_.erase(conn->shared_from_this());
            }
        },
        nullptr,
        [](bufferevent*, short what, void* c) {
            auto* conn = static_cast<Connection*>(c);
            if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR | BEV_EVENT_TIMEOUT)) {
                conn->closed = true;
                conn->service.connections_.erase(conn->shared_from_this());
            }
        },
        raw);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    fresh->start();
}

}  // namespace stepflow
