#include "proxy/peers.h"

#include <algorithm>
#include <cstring>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <unistd.h>

#include "core/log.h"
#include "core/net.h"
#include "discovery/k8s_source.h"
#include "proxy/metrics.h"

namespace stepflow {
namespace {

// One round of questions: lives until every peer answered or the timeout fired, whichever first.
struct Poll {
    std::function<void(Peers::Sum)> done;
    Peers::Sum sum;
    size_t pending = 0;
    event* timer = nullptr;
    std::vector<bufferevent*> conns;
    prometheus::Counter* reached = nullptr;
    prometheus::Counter* missed = nullptr;
    prometheus::Gauge* reached_gauge = nullptr;

    void finish() {
        for (auto* bev : conns)
            if (bev) bufferevent_free(bev);
        conns.clear();
        if (timer) event_free(timer);
        reached->Increment(double(sum.reached));
        missed->Increment(double(sum.asked - sum.reached));
        reached_gauge->Set(double(sum.reached));
        auto cb = std::move(done);
        Peers::Sum s = sum;
        delete this;
        cb(s);
    }
    void answered(size_t i, bool ok, uint64_t demand) {
        bufferevent_free(conns[i]);
        conns[i] = nullptr;
        if (ok) {
            sum.demand += demand;
            ++sum.reached;
        }
        if (--pending == 0) finish();
    }
};

struct Query {
    Poll* poll;
    size_t index;
};

void on_peer_read(bufferevent*, void*) {}  // the answer is read at EOF (Connection: close)

void on_peer_event(bufferevent* bev, short what, void* arg) {
    auto* q = static_cast<Query*>(arg);
    if (what & BEV_EVENT_CONNECTED) return;
    Poll* poll = q->poll;
    size_t index = q->index;
    delete q;
    bool ok = false;
    uint64_t demand = 0;
    if (what & BEV_EVENT_EOF) {
        evbuffer* in = bufferevent_get_input(bev);
        size_t len = evbuffer_get_length(in);
        std::string body(len, '\0');
        evbuffer_copyout(in, body.data(), len);
        ok = body.rfind("HTTP/1.1 200", 0) == 0 && Peers::parse_demand(body, demand);
    }
    poll->answered(index, ok, demand);
}

}  // namespace

namespace {

prometheus::Family<prometheus::Counter>& peer_queries() {
    static auto& family = prometheus::BuildCounter().Name("stepflow_lb_scaler_peer_queries_total")
                              .Help("Demand questions to peer replicas, by result")
                              .Register(Metrics::get().registry());
    return family;
}

}  // namespace

Peers::Peers(event_base* base, const Config& config)
    : base_(base), config_(config),
      reached_gauge_(prometheus::BuildGauge().Name("stepflow_lb_scaler_peers_reached")
                         .Help("Peers that answered the last demand poll of the external scaler")
                         .Register(Metrics::get().registry()).Add({})),
      reached_(peer_queries().Add({{"result", "answered"}})),
      missed_(peer_queries().Add({{"result", "missed"}})) {
    char host[256] = {};
    if (gethostname(host, sizeof host - 1) == 0) self_ = host;
    addresses_ = config.peers;
}

Peers::~Peers() = default;

bool Peers::start(std::string& error) {
    if (config_.peer_service.empty()) return true;
    K8sSettings settings;
    if (!k8s_settings_from_config(config_, settings, error)) return false;
    settings.service = config_.peer_service;
    settings.kind = K8sKind::EndpointSlices;
    settings.port = PortSelector{config_.peer_port_name, 0};
    auto source = K8sSource::create(base_, std::move(settings), error);
    if (!source) return false;
    source_ = std::move(source);
    source_->start([this](std::vector<Endpoint> endpoints) { set_endpoints(endpoints); });
    return true;
}

void Peers::set_endpoints(const std::vector<Endpoint>& endpoints) {
    std::vector<std::string> next;
    for (const auto& e : endpoints) {
        if (!e.ready || e.terminating) continue;       // a draining replica holds no new work
        if (!self_.empty() && e.pod == self_) continue;  // ourselves
        next.push_back(e.address);
    }
    if (next != addresses_) log::info("balancer peers changed", {{"peers", uint64_t(next.size())}});
    addresses_ = std::move(next);
}

bool Peers::parse_demand(std::string_view body, uint64_t& out) {
    size_t at = body.find("\"demand\":");
    if (at == std::string_view::npos) return false;
    at += 9;
    size_t digits = 0;
    out = 0;
    while (at + digits < body.size() && body[at + digits] >= '0' && body[at + digits] <= '9' && digits < 18)
        out = out * 10 + uint64_t(body[at + digits++] - '0');
    return digits > 0;
}

void Peers::poll(std::function<void(Sum)> done) {
    auto* poll = new Poll();
    poll->done = std::move(done);
    poll->reached = &reached_;
    poll->missed = &missed_;
    poll->reached_gauge = &reached_gauge_;
    poll->sum.asked = addresses_.size();
    if (addresses_.empty()) return poll->finish();
    for (const auto& address : addresses_) {
        HostPort hp;
        sockaddr_storage addr;
        socklen_t len;
        bufferevent* bev = nullptr;
        if (parse_host_port(address, hp) && numeric_sockaddr(hp, addr, len)) {
            bev = bufferevent_socket_new(base_, -1, BEV_OPT_CLOSE_ON_FREE);
            if (bev && bufferevent_socket_connect(bev, reinterpret_cast<sockaddr*>(&addr), int(len)) != 0) {
                bufferevent_free(bev);
                bev = nullptr;
            }
        }
        poll->conns.push_back(bev);
        if (!bev) continue;  // counted as asked, not reached
        ++poll->pending;
        bufferevent_setcb(bev, on_peer_read, nullptr, on_peer_event, new Query{poll, poll->conns.size() - 1});
        bufferevent_enable(bev, EV_READ);
        std::string req = "GET /demand HTTP/1.1\r\nHost: " + address + "\r\nConnection: close\r\n\r\n";
        bufferevent_write(bev, req.data(), req.size());
    }
    if (poll->pending == 0) return poll->finish();
    poll->timer = event_new(
        base_, -1, 0,
        [](int, short, void* arg) {
            auto* p = static_cast<Poll*>(arg);
            // The Query of each unanswered peer goes with its connection.
            for (auto* bev : p->conns) {
                if (!bev) continue;
                bufferevent_data_cb r, w;
                bufferevent_event_cb e;
                void* q = nullptr;
                bufferevent_getcb(bev, &r, &w, &e, &q);
                delete static_cast<Query*>(q);
            }
            event_free(p->timer);
            p->timer = nullptr;
            p->finish();
        },
        poll);
    timeval tv{long(config_.peer_timeout.count() / 1000), long((config_.peer_timeout.count() % 1000) * 1000)};
    evtimer_add(poll->timer, &tv);
}

}  // namespace stepflow
