#include "proxy/request.h"

#include "core/config.h"
#include "core/log.h"
#include "proxy/local_response.h"
#include "proxy/metrics.h"
#include "proxy/loop_thread.h"

namespace stepflow {

void Request::begin() {
    drop_exchange();
    record.begin();
    head.clear();
    local_.reset();
    logged_ = false;
}

const log::Correlation* Request::start_trace() {
    record.trace.begin(head);
    return record.trace.correlation();
}

bool Request::route() {
    exchange_ = &exchange_storage_.emplace(thread_, framing_, head, client_ip_, client_tls_);
    exchange_->set_trace(&record.trace);
    RouteOutcome outcome = exchange_->route();  // may start sending at once on a pooled connection
    if (outcome.kind != RouteOutcome::Refused) return true;
    record.decision = exchange_->decision();
    local_ = std::make_unique<RouteOutcome>(std::move(outcome));
    drop_exchange();
    return false;
}

void Request::drop_exchange() {
    exchange_ = nullptr;
    exchange_storage_.reset();
}

// The exchange ended, but it may be on the stack: its storage is kept until the next request
// or the request's end.
Exchange* Request::retire() {
    Exchange* ended = exchange_;
    exchange_ = nullptr;
    return ended;
}

std::string Request::pinned_id() const {
    if (!is_pinned(record.decision)) return {};
    return std::string(head.get(thread_.config().instance_header));
}

void Request::answer_locally(const std::string& id_json) {
    LocalAnswer answer = answer_failure(local_->failure, record.decision, id_json, local_->pinned_id, local_->detail);
    local_.reset();
    framing_.send_answer(answer);
}

void Request::note_rejected(int status, const char* why) {
    Metrics::get().rejected_requests.Increment();
    log::debug("request rejected", {{"client", client_ip_}, {"status", status}, {"reason", why}});
}

void Request::reject(int status, const char* why) {
    note_rejected(status, why);
    std::string body = "{\"error\":" + json_string(http1::status_reason(status)) + ",\"reason\":" + json_string(why) + "}";
    framing_.send_answer({status, std::move(body), false});
}

void Request::response_started(int status) {
    record.status = status;
    if (exchange_) record.note_route(*exchange_);
}

void Request::response_done() {
    record.note_route(*exchange_);
    thread_.series().body_sent(record.bytes_out);
    retire();
}

void Request::exchange_failed(Failure failure, const char* why, bool response_started) {
    record.note_route(*exchange_);
    Exchange* ended = retire();
    if (response_started) {
        // The response is already on its way: the client must see it break instead of a
        // silent truncation.
        log::Scope ids(record.trace.correlation());
        log::warn("response cut short", {{"instance", record.instance_id()}, {"reason", why}, {"client", client_ip_}});
        framing_.break_response(false);
        return;
    }
    std::string pinned = pinned_id();
    if (!ended->body_consumed()) {
        // The body never left the client: read it for its id, as for a routing miss.
        local_ = std::make_unique<RouteOutcome>(RouteOutcome{RouteOutcome::Refused, failure, pinned, why});
        if (framing_.read_body_for_id()) return;
        local_.reset();
    }
    framing_.send_answer(answer_failure(failure, record.decision, ended->replay_id_json(), pinned, why));
}

void Request::give_up_on_body() {
    exchange_->abort();  // the worker learns of it from the closed connection
    record.note_route(*exchange_);
    std::string id = exchange_->replay_id_json();
    retire();
    if (record.status != 0) {  // the response has started: it cannot be completed
        framing_.break_response(true);
        return;
    }
    framing_.send_answer(
        answer_failure(Failure::RequestBodyTimeout, record.decision, id, pinned_id(), "request body not received in time"));
}

void Request::cancel(int status) {
    if (exchange_) {
        // Closing the worker connection is how the worker learns the request was cancelled.
        exchange_->abort();
        record.note_route(*exchange_);
    }
    if (record.status == 0) record.status = status;
}

void Request::abandon() {
    exchange_->abort();
    record.note_route(*exchange_);
    retire();
}

void Request::await_body() { body_deadline_.arm(thread_.timers(), thread_.config().request_body_timeout); }

void Request::await_body_for_id() { body_deadline_.arm(thread_.timers(), thread_.config().local_body_timeout); }

void Request::on_body_timeout(void* arg) { static_cast<Request*>(arg)->framing_.body_timed_out(); }

void Request::release_head() {
    size_t method_len = head.method.size();
    std::string line;
    line.reserve(method_len + 1 + head.target.size());
    line.append(head.method);
    line += ' ';
    line.append(head.target);
    head.raw.swap(line);  // (assigning a short string would keep the old buffer)
    head.method = std::string_view(head.raw).substr(0, method_len);
    head.target = std::string_view(head.raw).substr(method_len + 1);
    head.host = {};
    std::vector<http1::Header>().swap(head.headers);
}

void Request::log_access() { record.finish(thread_, head.method, head.target, client_ip_); }

void Request::log_access_once() {
    if (logged_) return;
    logged_ = true;
    log_access();
}

}  // namespace stepflow
