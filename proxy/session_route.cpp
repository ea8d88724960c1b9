#include "proxy/session_route.h"

#include "core/log.h"
#include "discovery/instance.h"
#include "proxy/metrics.h"
#include "proxy/sessions.h"

namespace stepflow {

SessionRoute::Lookup SessionRoute::find(const Sessions& sessions, const http1::Head& request, std::string& instance_id,
                                        Failure& failure) {
    size_t first = 0;
    int named = sessions.count_in(request.headers, first);
    if (named == 0) return Lookup::None;
    if (named > 1) {
        // Only one could be unsealed or looked up; the others would reach the worker as sent.
        Metrics::get().rejected_requests.Increment();
        failure = Failure::SessionAmbiguous;
        return Lookup::Refused;
    }
    header_ = sessions.match(request.headers[first].name);
    value_ = request.headers[first].value;
    if (sessions.sealer) {
        OpenedSession opened;
        UnsealResult r = sessions.sealer->unseal(value_, instance_id, backend_session_, &opened);
        if (r != UnsealResult::Ok) {
            bool expired = r == UnsealResult::Expired;
            SessionMetrics::get().not_found[size_t(expired ? SessionMiss::Expired : SessionMiss::InvalidSeal)]->Increment();
            log::debug(expired ? "session id past --session-max-age" : "session id does not unseal",
                       {{"session", session_log_hash(value_)}});
            failure = Failure::SessionNotFound;
            return Lookup::Refused;
        }
        unsealed_ = true;
        stale_ = opened.stale;
        issued_at_ = opened.issued_at;
        return Lookup::Found;
    }
    return sessions.table->lookup(value_, instance_id) ? Lookup::Found : Lookup::None;
}

bool SessionRoute::instance_gone(const Sessions& sessions, const Instance* known, std::string_view instance_id) {
    // One still discovered but unhealthy keeps its sessions: a retryable 503 from the pin route,
    // so a short illness (slow health checks under load) does not end them. A 404 for one gone
    // makes an MCP client start a new session rather than wait.
    if (known && known->membership.load(std::memory_order_relaxed) != Membership::Gone) return false;
    SessionMetrics::get().not_found[size_t(SessionMiss::InstanceGone)]->Increment();
    log::debug("session's instance is gone", {{"session", session_log_hash(value_)}, {"instance", instance_id}});
    if (sessions.table) sessions.table->forget(value_);
    return true;
}

void SessionRoute::response_status(const Sessions& sessions, int status, std::string_view method) {
    if (!header_ || status / 100 != 2 || method != "DELETE") return;
    if (sessions.table) sessions.table->forget(value_);
    SessionMetrics::get().ended->Increment();
}

void SessionRoute::take(const Sessions& sessions, const http1::Header& h, const Instance& inst,
                        std::vector<http1::Header>& out) {
    if (sessions.sealer) {
        if (unsealed_ && h.value == backend_session_) {
            if (!stale_) {
                out.push_back({h.name, value_});  // the client's own sealed id still holds
                return;
            }
            reseal(sessions, inst);  // opened with an older key: hand back the same session under the current one
            if (!sealed_session_.empty()) out.push_back({h.name, sealed_session_});
            return;
        }
        sealed_session_ = sessions.sealer->seal(inst.id, h.value);
        SessionMetrics::get().learned->Increment();
        out.push_back({h.name, sealed_session_});
        return;
    }
    if (h.value != value_) SessionMetrics::get().learned->Increment();
    sessions.table->remember(h.value, inst.id);
    out.push_back(h);
}

void SessionRoute::reseal_if_stale(const Sessions& sessions, int status, std::string_view method, const Instance& inst,
                                   std::vector<http1::Header>& out) {
    if (!stale_ || !sealed_session_.empty() || status / 100 != 2 || method == "DELETE") return;
    reseal(sessions, inst);
    if (!sealed_session_.empty()) out.push_back({*header_, sealed_session_});
}

void SessionRoute::reseal(const Sessions& sessions, const Instance& inst) {
    // Keeps the original issue time, so re-sealing never extends --session-max-age.
    sealed_session_ = sessions.sealer->seal(inst.id, backend_session_, issued_at_);
    if (!sealed_session_.empty()) SessionMetrics::get().resealed->Increment();
}

}  // namespace stepflow
