// A request naming a session (--session-header, docs/sessions.md): which instance holds it, the
// id the worker sees, and the id the response hands back to the client. Routing to the instance
// itself is the pin route every pinned request takes (Exchange::pin_to).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/http1.h"
#include "proxy/failure_policy.h"

namespace stepflow {

struct Instance;
struct Sessions;

class SessionRoute {
public:
    enum class Lookup {
        None,     // names no session, or one never learned: the request goes by the other rules
        Found,    // `instance_id` holds it
        Refused,  // answer `failure` (ambiguous, or a sealed id that does not open)
    };
    Lookup find(const Sessions& sessions, const http1::Head& request, std::string& instance_id, Failure& failure);
    // The instance that minted the session left discovery or restarted (a new id): nobody else
    // knows the session. Counted, logged and forgotten here; the caller answers 404.
    bool instance_gone(const Sessions& sessions, const Instance* known, std::string_view instance_id);

    bool named() const { return header_ != nullptr; }
    // The request field to send as the backend's own id instead (sealed mode), or null.
    const std::string* backend_value_for(const http1::Header& h) const {
        return unsealed_ && h.value.data() == value_.data() ? &backend_session_ : nullptr;
    }

    // Response side. A 2xx to DELETE ends the session.
    void response_status(const Sessions& sessions, int status, std::string_view method);
    // A session field in the response: learned mode remembers it; sealed mode hands the client a
    // sealed id instead of the backend's.
    void take(const Sessions& sessions, const http1::Header& h, const Instance& inst, std::vector<http1::Header>& out);
    // After the response's fields: the worker did not repeat the session field of a session
    // opened with an older key; the balancer adds it, re-sealed.
    void reseal_if_stale(const Sessions& sessions, int status, std::string_view method, const Instance& inst,
                         std::vector<http1::Header>& out);

private:
    void reseal(const Sessions& sessions, const Instance& inst);

    const std::string* header_ = nullptr;  // the --session-header the request carries
    std::string_view value_;               // its value (a view of the request head)
    bool unsealed_ = false;                // backend_session_ replaces it upstream
    bool stale_ = false;                   // opened with an older key: re-sealed on the response
    int64_t issued_at_ = 0;
    std::string backend_session_;
    std::string sealed_session_;  // the sealed id sent to the client (the header list views it)
};

}  // namespace stepflow
