// What a loop thread needs of any client connection, whatever protocol it speaks.
#pragma once

#include <cstddef>
#include <vector>

namespace stepflow {

class ClientConnection {
public:
    virtual ~ClientConnection() = default;
    // Shutdown has begun: finish what is in flight, take no new requests, then close.
    virtual void drain() = 0;
    // The drain timeout ran out: close now.
    virtual void close_now() = 0;

private:
    friend class ConnectionList;
    ClientConnection* prev_ = nullptr;
    ClientConnection* next_ = nullptr;
};

// A loop thread's open connections. Intrusive, so tracking one costs no allocation (a set
// node per connection shows in the memory each open stream holds).
class ConnectionList {
public:
    void add(ClientConnection* conn);
    void remove(ClientConnection* conn);  // nothing when not listed
    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    // A copy to iterate over while the calls made on each may remove it.
    std::vector<ClientConnection*> snapshot() const;

private:
    ClientConnection* head_ = nullptr;
    size_t size_ = 0;
};

inline void ConnectionList::add(ClientConnection* conn) {
    conn->prev_ = nullptr;
    conn->next_ = head_;
    if (head_) head_->prev_ = conn;
    head_ = conn;
    ++size_;
}

inline void ConnectionList::remove(ClientConnection* conn) {
    if (!conn->prev_ && head_ != conn) return;
    if (conn->prev_) conn->prev_->next_ = conn->next_;
    else head_ = conn->next_;
    if (conn->next_) conn->next_->prev_ = conn->prev_;
    conn->prev_ = conn->next_ = nullptr;
    --size_;
}

inline std::vector<ClientConnection*> ConnectionList::snapshot() const {
    std::vector<ClientConnection*> all;
    all.reserve(size_);
    for (ClientConnection* c = head_; c; c = c->next_) all.push_back(c);
    return all;
}

}  // namespace stepflow
