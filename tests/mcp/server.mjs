// An MCP server built with the official TypeScript SDK, speaking Streamable HTTP (stateful: the
// SDK mints a session id on initialize), for tests/integration/test_mcp_sdk.py.
//
//   node server.mjs NAME   -> prints "listening PORT" once it accepts connections on 127.0.0.1
//
// Tool `whoami` answers NAME, and sends a logging notification naming NAME with no related
// request, which the SDK delivers on the session's standalone GET SSE stream. GET /health answers
// 200 (the balancer's --health-check http); GET /stats answers what this process saw.
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';

const name = process.argv[2] || 'mcp';
const transports = new Map(); // session id -> transport
const stats = { requests: 0, byMethod: {}, sessionsOpened: 0, sessionsClosed: 0, unknownSession: 0, toolCalls: 0 };

function newSession() {
  const server = new McpServer({ name: `stepflow-lb-test-${name}`, version: '1.0.0' },
                               { capabilities: { logging: {} } });
  const transport = new StreamableHTTPServerTransport({
    sessionIdGenerator: () => randomUUID(),
    onsessioninitialized: (id) => { transports.set(id, transport); stats.sessionsOpened++; },
  });
  transport.onclose = () => {
    if (transport.sessionId && transports.delete(transport.sessionId)) stats.sessionsClosed++;
  };
  server.registerTool('whoami', { description: 'Names the server instance that answers' }, async () => {
    stats.toolCalls++;
    // No related request: the SDK sends it on the standalone GET stream when one is open.
    await server.sendLoggingMessage({ level: 'info', data: { instance: name } });
    return { content: [{ type: 'text', text: name }] };
  });
  return { server, transport };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const parts = [];
    req.on('data', (c) => parts.push(c));
    req.on('end', () => resolve(Buffer.concat(parts).toString()));
    req.on('error', reject);
  });
}

function json(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/json' });
  res.end(JSON.stringify(body));
}

const httpServer = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/health') return json(res, 200, { status: 'ok' });
  if (url.pathname === '/stats') return json(res, 200, { name, ...stats, sessions: transports.size });
  if (url.pathname !== '/mcp') return json(res, 404, { error: 'not found' });
  stats.requests++;
  stats.byMethod[req.method] = (stats.byMethod[req.method] || 0) + 1;
  try {
    const sid = req.headers['mcp-session-id'];
    let body;
    if (req.method === 'POST') body = JSON.parse((await readBody(req)) || 'null');
    if (sid) {
      const transport = transports.get(sid);
      if (!transport) {
        stats.unknownSession++;
        return json(res, 404, { jsonrpc: '2.0', error: { code: -32001, message: 'Session not found' }, id: null });
      }
      return await transport.handleRequest(req, res, body);
    }
    if (req.method === 'POST' && isInitializeRequest(body)) {
      const { server, transport } = newSession();
      await server.connect(transport);
      return await transport.handleRequest(req, res, body);
    }
    return json(res, 400, { jsonrpc: '2.0', error: { code: -32000, message: 'No session id' }, id: null });
  } catch (e) {
    if (!res.headersSent) json(res, 500, { jsonrpc: '2.0', error: { code: -32603, message: String(e) }, id: null });
  }
});

httpServer.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening ${httpServer.address().port}\n`);
});
process.on('SIGTERM', () => process.exit(0));
