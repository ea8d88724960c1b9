"""Shared by the session tests: a round-robin TCP front for balancer replicas, and sealing keys."""

import os
import socket
import threading


class RoundRobinRelay:
    """A tiny TCP front: each new client connection goes to the next balancer replica."""

    def __init__(self, ports):
        self.ports = ports
        self.next = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            port = self.ports[self.next % len(self.ports)]
            self.next += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", port))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def key_file(name):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"stepflow-lb-test-{os.getpid()}-{name}.key")
    with open(path, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path
