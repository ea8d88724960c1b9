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


def new_key():
    return os.urandom(32).hex()


class SecretVolume:
    """A directory laid out as Kubernetes mounts a Secret: the files live in a dated folder,
    `..data` points at it, and each key name is a symlink through `..data`. An update writes a new
    folder and swaps `..data` with one rename, so a reader sees the old set or the new, never half."""

    def __init__(self, name, files):
        self.path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"stepflow-lb-test-{os.getpid()}-{name}")
        os.makedirs(self.path)
        self.version = 0
        self.names = set()
        self.update(files)

    def update(self, files):
        self.version += 1
        folder = f"..{self.version:04d}"
        os.makedirs(os.path.join(self.path, folder))
        for name, text in files.items():
            with open(os.path.join(self.path, folder, name), "w") as f:
                f.write(text)
        tmp = os.path.join(self.path, "..data_tmp")
        os.symlink(folder, tmp)
        os.rename(tmp, os.path.join(self.path, "..data"))
        for name in files:
            if name not in self.names:
                os.symlink(os.path.join("..data", name), os.path.join(self.path, name))
                self.names.add(name)
        for name in self.names - set(files):
            os.unlink(os.path.join(self.path, name))
            self.names.discard(name)


def write_atomically(path, text):
    """Replaces a file the way a config tool does: write beside it, then rename over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
