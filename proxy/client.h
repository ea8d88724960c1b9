// What a worker thread needs of any client connection, whatever protocol it speaks.
#pragma once

namespace stepflow {

class ClientConnection {
public:
    virtual ~ClientConnection() = default;
    // Shutdown has begun: finish what is in flight, take no new requests, then close.
    virtual void drain() = 0;
    // The drain timeout ran out: close now.
    virtual void close_now() = 0;
};

}  // namespace stepflow
