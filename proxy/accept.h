// A new client connection before we know its protocol: on the plain listener the first bytes
// tell (the HTTP/2 connection preface, or anything else for HTTP/1.1); on the TLS listener the
// handshake's ALPN result tells. Then the connection is handed to ClientH1 or ClientH2.
#pragma once

#include <string>

#include "proxy/client.h"


namespace stepflow {

class Conn;

class LoopThread;

class ProtocolSniffer final : public ClientConnection {
public:
    ProtocolSniffer(LoopThread& thread, Conn* transport, std::string client_ip, bool tls);
    ~ProtocolSniffer() override;
    void drain() override;
    void close_now() override;

private:
    static void on_read(Conn*, void* arg);
    static void on_event(Conn*, short what, void* arg);
    void decide();
    void hand_over(bool http2);

    LoopThread& thread_;
    Conn* transport_;
    std::string client_ip_;
    bool tls_;
    bool draining_ = false;  // hand over for one request (HTTP/1.1) or a GOAWAY (HTTP/2)
};

}  // namespace stepflow
