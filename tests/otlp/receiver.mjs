// An OTLP trace receiver for tests/integration/test_tracing.py: OTLP/gRPC (with @grpc/grpc-js)
// and OTLP/HTTP protobuf (POST /v1/traces), both decoded with the protobuf definitions the
// OpenTelemetry JS SDK ships (@opentelemetry/otlp-transformer), so the balancer's encoding is
// checked by someone else's decoder.
//
//   node receiver.mjs [GRPC_PORT HTTP_PORT [count-only|sink]]
//                                count-only: decode and count spans, keep none (bench/);
//                                sink: acknowledge without decoding, count bytes (bench/)
//                                prints {"grpc": PORT, "http": PORT} once listening
//   GET  /spans                  every span received, decoded (ids as lowercase hex)
//   GET  /stats                  {"grpcCalls", "httpCalls", "refused", "callTimesMs", "lastHeaders"}
//   POST /mode {"mode": "ok"|"refuse"|"slow"|"partial"|"throttle", "delayMs": N, ...}
//       refuse: gRPC UNAVAILABLE / HTTP 503; slow: answer after delayMs;
//       partial: take the spans but answer a partial success that rejects "rejected" of them;
//       throttle: to the next "times" exports, HTTP 429 with Retry-After "retryAfter" seconds, or
//       gRPC RESOURCE_EXHAUSTED with a google.rpc.RetryInfo of that delay (grpc-status-details-bin);
//       "chunked": true: OTLP/HTTP answers in two chunks, without a length;
//       "interim": true: an OTLP/HTTP answer comes after a 100 Continue nobody asked for;
//       reject: gRPC INVALID_ARGUMENT / HTTP 400 with a google.rpc.Status, "message" saying why
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import http from "node:http";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const root = require("@opentelemetry/otlp-transformer/build/src/generated/root");
const { ExportTraceServiceRequest, ExportTraceServiceResponse } = root.opentelemetry.proto.collector.trace.v1;

const spans = [];
const stats = { grpcCalls: 0, httpCalls: 0, httpConnections: 0, refused: 0, spans: 0, bytes: 0, callTimesMs: [],
  lastHeaders: {} };
const exportSockets = new WeakSet(); // the connections OTLP/HTTP exports came on
const countOnly = process.argv[4] === "count-only"; // bench/: count spans, keep none
const sink = process.argv[4] === "sink"; // bench/: no decoding at all (it would share the load's core)
let mode = { mode: "ok", delayMs: 0 };

const hex = (b) => (b && b.length ? Buffer.from(b).toString("hex") : "");

function value(v) {
  if (!v) return null;
  switch (v.value) {
    case "stringValue": return v.stringValue;
    case "boolValue": return v.boolValue;
    case "intValue": return Number(v.intValue.toString());
    case "doubleValue": return v.doubleValue;
    case "bytesValue": return hex(v.bytesValue);
    default: return null;
  }
}

function attributes(list) {
  const out = {};
  for (const kv of list || []) out[kv.key] = value(kv.value);
  return out;
}

function collect(request, protocol) {
  for (const rs of request.resourceSpans) {
    if (countOnly) {
      for (const ss of rs.scopeSpans) stats.spans += ss.spans.length;
      continue;
    }
    const resource = attributes(rs.resource && rs.resource.attributes);
    for (const ss of rs.scopeSpans) {
      for (const s of ss.spans) {
        spans.push({
          protocol,
          resource,
          scope: ss.scope ? ss.scope.name : "",
          traceId: hex(s.traceId),
          spanId: hex(s.spanId),
          parentSpanId: hex(s.parentSpanId),
          name: s.name,
          kind: s.kind,
          flags: s.flags,
          startTimeUnixNano: s.startTimeUnixNano.toString(),
          endTimeUnixNano: s.endTimeUnixNano.toString(),
          attributes: attributes(s.attributes),
          events: (s.events || []).map((e) => ({ name: e.name, attributes: attributes(e.attributes) })),
          status: s.status ? { code: s.status.code, message: s.status.message } : { code: 0, message: "" },
        });
      }
    }
  }
}

const later = (fn) => (mode.mode === "slow" ? setTimeout(fn, mode.delayMs) : fn());
// A full success, or in "partial" mode OTLP's partial success.
const response = () =>
  ExportTraceServiceResponse.create(
    mode.mode === "partial"
      ? { partialSuccess: { rejectedSpans: mode.rejected || 1, errorMessage: mode.message || "rejected on purpose" } }
      : {},
  );
// Each export's time, and the last export's headers (gRPC metadata) as strings.
// google.rpc.Status {code, message, details: [Any {RetryInfo {retry_delay: Duration {seconds}}}]},
// in protobuf's wire format (the packages above carry no google.rpc messages).
function rpcStatus(code, message, seconds) {
  const varint = (n) => {
    const out = [];
    do {
      out.push((n & 0x7f) | (n > 0x7f ? 0x80 : 0));
      n = Math.floor(n / 128);
    } while (n > 0);
    return Buffer.from(out);
  };
  const field = (n, bytes) => Buffer.concat([varint((n << 3) | 2), varint(bytes.length), bytes]);
  const status = [varint(1 << 3), varint(code), field(2, Buffer.from(message))];
  if (seconds !== undefined) {
    const duration = Buffer.concat([varint(1 << 3), varint(seconds)]);
    status.push(field(3, Buffer.concat([field(1, Buffer.from("type.googleapis.com/google.rpc.RetryInfo")),
      field(2, field(1, duration))])));
  }
  return Buffer.concat(status);
}
const rejectMessage = () => mode.message || "rejected on purpose";
const throttled = () => {
  if (mode.mode !== "throttle" || (mode.times ?? 1) <= 0) return false;
  mode.times = (mode.times ?? 1) - 1;
  stats.refused++;
  return true;
};

const called = (headers) => {
  if (stats.callTimesMs.length < 1000) stats.callTimesMs.push(Date.now());
  stats.lastHeaders = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k, String(v)]));
};

const server = new grpc.Server();
server.addService(
  {
    Export: {
      path: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
      requestStream: false,
      responseStream: false,
      requestSerialize: (m) => Buffer.from(ExportTraceServiceRequest.encode(m).finish()),
      requestDeserialize: (b) => (sink ? b : ExportTraceServiceRequest.decode(b)),
      responseSerialize: (m) => Buffer.from(ExportTraceServiceResponse.encode(m).finish()),
      responseDeserialize: (b) => ExportTraceServiceResponse.decode(b),
    },
  },
  {
    Export(call, callback) {
      stats.grpcCalls++;
      called(call.metadata.getMap());
      if (mode.mode === "refuse") {
        stats.refused++;
        return callback({ code: grpc.status.UNAVAILABLE, details: "refusing on purpose" });
      }
      if (mode.mode === "reject") {
        stats.refused++;
        return callback({ code: grpc.status.INVALID_ARGUMENT, details: rejectMessage() });
      }
      if (throttled()) {
        const metadata = new grpc.Metadata();
        const code = grpc.status.RESOURCE_EXHAUSTED;
        metadata.set("grpc-status-details-bin", rpcStatus(code, "slow down", mode.retryAfter ?? 1));
        return callback({ code, details: "slow down", metadata });
      }
      later(() => {
        if (sink) stats.bytes += call.request.length;
        else collect(call.request, "grpc");
        callback(null, response());
      });
    },
  },
);

const web = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const json = (status, obj) => {
      const text = Buffer.from(JSON.stringify(obj));
      res.writeHead(status, { "content-type": "application/json", "content-length": text.length });
      res.end(text);
    };
    if (req.method === "GET" && req.url === "/spans") return json(200, spans);
    if (req.method === "GET" && req.url === "/stats") return json(200, stats);
    if (req.method === "POST" && req.url === "/mode") {
      mode = { mode: "ok", delayMs: 0, ...JSON.parse(body.toString() || "{}") };
      return json(200, mode);
    }
    if (req.method === "POST" && req.url === "/v1/traces") {
      stats.httpCalls++;
      called(req.headers);
      if (!exportSockets.has(req.socket)) {
        exportSockets.add(req.socket);
        stats.httpConnections++;
      }
      if (req.headers["content-type"] !== "application/x-protobuf") return json(415, { error: "content-type" });
      if (mode.mode === "refuse") {
        stats.refused++;
        return json(503, { error: "refusing on purpose" });
      }
      if (mode.mode === "reject") {
        stats.refused++;
        const status = rpcStatus(3, rejectMessage());
        res.writeHead(400, { "content-type": "application/x-protobuf", "content-length": status.length });
        return res.end(status);
      }
      if (throttled()) {
        res.setHeader("retry-after", String(mode.retryAfter ?? 1));
        return json(429, { error: "slow down" });
      }
      let decoded;
      try {
        decoded = ExportTraceServiceRequest.decode(body);
      } catch (e) {
        return json(400, { error: String(e) });
      }
      return later(() => {
        collect(decoded, "http");
        // With its length, as the collector's Go server writes a small answer, or in chunks.
        const answer = Buffer.from(ExportTraceServiceResponse.encode(response()).finish());
        if (mode.interim) res.writeContinue();
        if (mode.chunked) {
          res.writeHead(200, { "content-type": "application/x-protobuf" });
          res.write(answer.subarray(0, 3));
          return res.end(answer.subarray(3));
        }
        res.writeHead(200, { "content-type": "application/x-protobuf", "content-length": answer.length });
        res.end(answer);
      });
    }
    json(404, { error: "not found" });
  });
});

// OTLP_TLS_CERT / OTLP_TLS_KEY (PEM files): the gRPC port speaks TLS (the control port stays plain).
const credentials = process.env.OTLP_TLS_CERT
  ? grpc.ServerCredentials.createSsl(null, [
      { cert_chain: readFileSync(process.env.OTLP_TLS_CERT), private_key: readFileSync(process.env.OTLP_TLS_KEY) },
    ])
  : grpc.ServerCredentials.createInsecure();
const grpcPort = await new Promise((resolve, reject) =>
  server.bindAsync(`127.0.0.1:${process.argv[2] || 0}`, credentials, (err, port) =>
    err ? reject(err) : resolve(port),
  ),
);
await new Promise((resolve) => web.listen(Number(process.argv[3] || 0), "127.0.0.1", resolve));
console.log(JSON.stringify({ grpc: grpcPort, http: web.address().port }));
process.on("SIGTERM", () => process.exit(0));
