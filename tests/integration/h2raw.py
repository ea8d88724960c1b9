"""A deliberately small HTTP/2 client speaking raw frames, for tests that real clients cannot
express: illegal header names, connection-specific fields, a content-length that disagrees with
the DATA, more streams than the server allows, resets at chosen moments.

Python standard library only. It encodes header blocks with the simplest HPACK representation
(literal without indexing, new name, no Huffman: RFC 7541 §6.2.2) and never decodes the server's
header blocks in general. It asks the server for a zero-sized dynamic table
(SETTINGS_HEADER_TABLE_SIZE = 0), so every response block is self-contained, and decodes only
the `:status` field that opens it (RFC 9113 §8.3: pseudo-header fields come first).

    c = H2Client("127.0.0.1", port)
    sid = c.request(body=b'{"jsonrpc":"2.0",...}')
    c.wait(lambda: c.streams[sid].ended, what="response")
    c.streams[sid].status, bytes(c.streams[sid].data)
"""

import socket
import ssl
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = {DATA: "DATA", HEADERS: "HEADERS", PRIORITY: "PRIORITY", RST_STREAM: "RST_STREAM",
               SETTINGS: "SETTINGS", PUSH_PROMISE: "PUSH_PROMISE", PING: "PING", GOAWAY: "GOAWAY",
               WINDOW_UPDATE: "WINDOW_UPDATE", CONTINUATION: "CONTINUATION"}

# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings (RFC 9113 §6.5.2)
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = range(1, 7)

# Error codes (RFC 9113 §7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, \
    REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM, INADEQUATE_SECURITY, \
    HTTP_1_1_REQUIRED = range(14)
ERROR_NAMES = {v: k for k, v in dict(
    NO_ERROR=0, PROTOCOL_ERROR=1, INTERNAL_ERROR=2, FLOW_CONTROL_ERROR=3, SETTINGS_TIMEOUT=4, STREAM_CLOSED=5,
    FRAME_SIZE_ERROR=6, REFUSED_STREAM=7, CANCEL=8, COMPRESSION_ERROR=9, CONNECT_ERROR=10, ENHANCE_YOUR_CALM=11,
    INADEQUATE_SECURITY=12, HTTP_1_1_REQUIRED=13).items()}

# HPACK static table entries for :status (RFC 7541 Appendix A, indices 8..14).
_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}
# Huffman codes of the ten digits (RFC 7541 Appendix B): (code, bit length). A status value is
# three digits, so this is all of the Huffman table a status decoder needs.
_DIGIT_CODES = {(0b00000, 5): "0", (0b00001, 5): "1", (0b00010, 5): "2", (0b011001, 6): "3",
                (0b011010, 6): "4", (0b011011, 6): "5", (0b011100, 6): "6", (0b011101, 6): "7",
                (0b011110, 6): "8", (0b011111, 6): "9"}



SEND_TIMEOUT = 10.0  # seconds a frame may take to leave (the balancer's window open)

class H2Error(Exception):
    pass


# --------------------------------------------------------------------------- #
# HPACK, the small part we need
# --------------------------------------------------------------------------- #

def encode_int(value, prefix_bits, first_byte_flags=0):
    """RFC 7541 §5.1 integer with an N-bit prefix; flags go into the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    out = bytearray([first_byte_flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_int(data, pos, prefix_bits):
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def encode_string(raw):
    return encode_int(len(raw), 7) + raw  # H bit clear: no Huffman


def encode_headers(headers):
    """Every field as "literal header field without indexing, new name" (first byte 0x00)."""
    block = bytearray()
    for name, value in headers:
        name = name.encode() if isinstance(name, str) else name
        value = value.encode() if isinstance(value, str) else value
        block += b"\x00" + encode_string(name) + encode_string(value)
    return bytes(block)


def _huffman_digits(raw):
    bits = "".join(format(b, "08b") for b in raw)
    out, pos = "", 0
    while pos < len(bits):
        for length in (5, 6):
            piece = bits[pos:pos + length]
            if len(piece) == length and (int(piece, 2), length) in _DIGIT_CODES:
                out += _DIGIT_CODES[(int(piece, 2), length)]
                pos += length
                break
        else:
            if set(bits[pos:]) <= {"1"} and len(bits) - pos < 8:
                break  # padding: the most significant bits of EOS
            raise H2Error("status value is not Huffman-coded digits")
    return out


def decode_status(block):
    """The :status of a response header block encoded against an empty dynamic table."""
    pos = 0
    while pos < len(block) and block[pos] & 0xE0 == 0x20:  # dynamic table size update(s)
        _, pos = decode_int(block, pos, 5)
    first = block[pos]
    if first & 0x80:  # indexed field
        index, _ = decode_int(block, pos, 7)
        if index in _STATIC_STATUS:
            return _STATIC_STATUS[index]
        raise H2Error(f"first field is indexed entry {index}, not :status")
    if first & 0xC0 == 0x40:
        index, pos = decode_int(block, pos, 6)
    else:
        index, pos = decode_int(block, pos, 4)
    if index not in _STATIC_STATUS:
        raise H2Error(f"first field names index {index}, not :status")
    huffman = block[pos] & 0x80
    length, pos = decode_int(block, pos, 7)
    raw = block[pos:pos + length]
    return int(_huffman_digits(raw) if huffman else raw.decode())


# --------------------------------------------------------------------------- #
# Frames and the connection
# --------------------------------------------------------------------------- #

class Frame:
    def __init__(self, type, flags, stream_id, payload):
        self.type, self.flags, self.stream_id, self.payload = type, flags, stream_id, payload

    @property
    def error_code(self):
        if self.type == RST_STREAM:
            return struct.unpack(">I", self.payload[:4])[0]
        if self.type == GOAWAY:
            return struct.unpack(">I", self.payload[4:8])[0]
        return None

    def __repr__(self):
        extra = ""
        if self.error_code is not None:
            extra = " " + ERROR_NAMES.get(self.error_code, str(self.error_code))
        name = FRAME_NAMES.get(self.type, self.type)
        return f"<{name} stream={self.stream_id} flags={self.flags:#x} len={len(self.payload)}{extra}>"


class Stream:
    def __init__(self, stream_id):
        self.id = stream_id
        self.status = None
        self.header_blocks = []
        self.data = bytearray()
        self.ended = False        # END_STREAM received
        self.reset_code = None    # RST_STREAM received
        self.done_at = None       # monotonic time of END_STREAM or RST_STREAM

    @property
    def closed(self):
        return self.ended or self.reset_code is not None


class H2Client:
    """One HTTP/2 connection (h2c prior knowledge, or h2 over TLS when `ssl_context` is given).

    `auto_window` opens the flow-control windows again as DATA arrives (a normal reader); with
    it off the client reads no further than its initial windows allow, like a stalled reader.
    A stream id put in `stalled` keeps its own window shut while the connection's stays open.
    """

    def __init__(self, host, port, ssl_context=None, server_hostname=None, timeout=10, settings=None,
                 auto_window=True, initial_window=None):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            self.sock = ssl_context.wrap_socket(self.sock, server_hostname=server_hostname or host)
            if self.sock.selected_alpn_protocol() != "h2":
                raise H2Error(f"ALPN chose {self.sock.selected_alpn_protocol()!r}, not h2")
        self.buffer = bytearray()
        self.streams = {}
        self.frames = []            # every frame received, in order
        self.goaway = None          # (last_stream_id, error_code)
        self.server_settings = {}
        self.settings_acked = False
        self.eof = False
        self.auto_window = auto_window
        self.stalled = set()        # stream ids whose window auto_window leaves shut (a stalled reader)
        self._next_id = 1
        ours = {HEADER_TABLE_SIZE: 0, ENABLE_PUSH: 0}
        if initial_window is not None:
            ours[INITIAL_WINDOW_SIZE] = initial_window
        ours.update(settings or {})
        self.sock.sendall(PREFACE + self._frame(SETTINGS, 0, 0, b"".join(
            struct.pack(">HI", k, v) for k, v in ours.items())))

    # ---- sending ----
    @staticmethod
    def _frame(type, flags, stream_id, payload):
        return struct.pack(">I", len(payload))[1:] + bytes([type, flags]) + struct.pack(">I", stream_id & 0x7FFFFFFF) + payload

    def send_frame(self, type, flags, stream_id, payload=b""):
        # A read leaves the socket's timeout at what remained of its wait (as little as a few ms):
        # a send must not inherit it, or a balancer descheduled for a moment fails the test.
        self.sock.settimeout(SEND_TIMEOUT)
        self.sock.sendall(self._frame(type, flags, stream_id, payload))

    def _reply(self, type, flags, stream_id, payload=b""):
        """A frame the client sends on its own (ACKs, window updates): a closed socket is not an error."""
        try:
            self.send_frame(type, flags, stream_id, payload)
        except OSError:
            pass

    def new_stream_id(self):
        sid = self._next_id
        self._next_id += 2
        self.streams[sid] = Stream(sid)
        return sid

    def send_headers(self, stream_id, headers, end_stream=False, frame_size=16384):
        """A header block in one HEADERS frame, or split over CONTINUATION frames when large."""
        if stream_id not in self.streams:
            self.streams[stream_id] = Stream(stream_id)
        block = encode_headers(headers)
        pieces = [block[i:i + frame_size] for i in range(0, len(block), frame_size)] or [b""]
        for i, piece in enumerate(pieces):
            flags = END_HEADERS if i == len(pieces) - 1 else 0
            if i == 0:
                self.send_frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream_id, piece)
            else:
                self.send_frame(CONTINUATION, flags, stream_id, piece)

    def send_data(self, stream_id, data, end_stream=False, frame_size=16384):
        """DATA frames, sent without regard to the server's flow-control windows: keep bodies
        within its initial window (stepflow-lb's default is 256 KiB)."""
        if not data:
            self.send_frame(DATA, END_STREAM if end_stream else 0, stream_id, b"")
            return
        for start in range(0, len(data), frame_size):
            last = start + frame_size >= len(data)
            self.send_frame(DATA, END_STREAM if (end_stream and last) else 0, stream_id, data[start:start + frame_size])

    def send_rst(self, stream_id, code=CANCEL):
        self.send_frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))

    def send_window_update(self, stream_id, increment):
        self.send_frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))

    def request(self, body=b"", headers=None, path="/", method="POST", authority="lb.test", scheme="http",
                end_stream=True, content_length=True):
        """Opens a stream with a JSON POST (or any method); returns its id."""
        sid = self.new_stream_id()
        fields = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path)]
        if method == "POST":
            fields.append(("content-type", "application/json"))
            if content_length:
                fields.append(("content-length", str(len(body))))
        fields += list(headers or [])
        if body:
            self.send_headers(sid, fields, end_stream=False)
            self.send_data(sid, body, end_stream=end_stream)
        else:
            self.send_headers(sid, fields, end_stream=end_stream)
        return sid

    # ---- receiving ----
    def _read_more(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(min(remaining, 1.0))
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return True
        except (ConnectionResetError, ssl.SSLError, OSError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _take_frame(self):
        if len(self.buffer) < 9:
            return None
        length = int.from_bytes(self.buffer[:3], "big")
        if len(self.buffer) < 9 + length:
            return None
        type, flags = self.buffer[3], self.buffer[4]
        stream_id = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
        payload = bytes(self.buffer[9:9 + length])
        del self.buffer[:9 + length]
        return Frame(type, flags, stream_id, payload)

    def _handle(self, f):
        self.frames.append(f)
        stream = self.streams.get(f.stream_id) if f.stream_id else None
        if f.type == SETTINGS:
            if f.flags & ACK:
                self.settings_acked = True
            else:
                for i in range(0, len(f.payload), 6):
                    k, v = struct.unpack(">HI", f.payload[i:i + 6])
                    self.server_settings[k] = v
                self._reply(SETTINGS, ACK, 0)
        elif f.type == PING and not f.flags & ACK:
            self._reply(PING, ACK, 0, f.payload)
        elif f.type == GOAWAY:
            last, code = struct.unpack(">II", f.payload[:8])
            self.goaway = (last & 0x7FFFFFFF, code)
        elif f.type == HEADERS and stream is not None:
            payload = f.payload
            if f.flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if f.flags & PRIORITY_FLAG:
                payload = payload[5:]
            if stream.status is None or stream.status < 200:
                stream.status = decode_status(payload)
            stream.header_blocks.append(payload)
            if f.flags & END_STREAM:
                stream.ended, stream.done_at = True, time.monotonic()
        elif f.type == DATA:
            payload = f.payload
            if f.flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if stream is not None:
                stream.data += payload
                if f.flags & END_STREAM:
                    stream.ended, stream.done_at = True, time.monotonic()
            if self.auto_window and len(f.payload):
                self._reply(WINDOW_UPDATE, 0, 0, struct.pack(">I", len(f.payload)))
                if stream is not None and not stream.closed and f.stream_id not in self.stalled:
                    self._reply(WINDOW_UPDATE, 0, f.stream_id, struct.pack(">I", len(f.payload)))
        elif f.type == RST_STREAM and stream is not None:
            stream.reset_code, stream.done_at = f.error_code, time.monotonic()

    def poll(self, timeout=0.0):
        """Handles whatever frames arrive within `timeout`; returns False once the server closed."""
        deadline = time.monotonic() + timeout
        while True:
            f = self._take_frame()
            if f is not None:
                self._handle(f)
                continue
            if self.eof or not self._read_more(deadline):
                return not self.eof
            if time.monotonic() >= deadline and not self.buffer:
                return True

    def wait(self, predicate, timeout=10.0, what="condition"):
        """Reads frames until predicate() holds; raises H2Error at the deadline or on EOF."""
        deadline = time.monotonic() + timeout
        while not predicate():
            f = self._take_frame()
            if f is not None:
                self._handle(f)
                continue
            if self.eof:
                raise H2Error(f"connection closed while waiting for {what}; frames: {self.frames[-8:]}")
            if time.monotonic() >= deadline:
                raise H2Error(f"timed out waiting for {what}; frames: {self.frames[-8:]}")
            self._read_more(deadline)
        return True

    def wait_closed(self, timeout=10.0):
        """Reads until the server closes the connection; True if it did within the time."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            f = self._take_frame()
            if f is not None:
                self._handle(f)
            else:
                self._read_more(deadline)
        return self.eof

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
