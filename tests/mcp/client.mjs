// MCP clients built with the official TypeScript SDK (Streamable HTTP), for
// tests/integration/test_mcp_sdk.py.
//
//   node client.mjs URL SESSIONS CALLS [hold]
//
// Runs SESSIONS sessions at once. Each initializes (the server mints Mcp-Session-Id), calls the
// tool `whoami` CALLS times, waits until its standalone GET SSE stream brought a notification,
// then ends the session with DELETE. Every answer and notification names the server instance;
// a session that meets two names is split. With `hold`, every session stops after its first
// call, once its GET stream brought a notification; when all have, the process prints "ready" and
// waits for a line on stdin before going on (the test restarts or kills something meanwhile);
// MCP_HOLDS=N makes N such stops, one call apart. Prints one JSON summary line and exits 0.
import readline from 'node:readline';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { LoggingMessageNotificationSchema } from '@modelcontextprotocol/sdk/types.js';

const [url, sessionsArg, callsArg, mode] = process.argv.slice(2);
const sessions = Number(sessionsArg || 20), calls = Number(callsArg || 5), hold = mode === 'hold';
const NOTIFICATION_WAIT_MS = Number(process.env.MCP_NOTIFICATION_WAIT_MS || 15000);

// Hold points (MCP_HOLDS, default 1): at each, every session has made one more call; when all
// have arrived (or failed before), "ready" is printed and a "go" line on stdin releases them.
const HOLDS = hold ? Number(process.env.MCP_HOLDS || 1) : 0;
const rounds = Array.from({ length: HOLDS }, () => {
  const round = { arrived: 0 };
  round.all = new Promise((resolve) => { round.allArrived = resolve; });
  round.released = new Promise((resolve) => { round.release = resolve; });
  round.arrive = () => { if (++round.arrived === sessions) round.allArrived(); };
  return round;
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function whoami(client, result) {
  const answer = await client.callTool({ name: 'whoami', arguments: {} });
  const name = answer.content?.[0]?.text;
  result.calls++;
  result.names.add(name);
  result.instance ??= name;
}

async function runSession(index) {
  const result = { index, instance: null, calls: 0, notifications: 0, names: new Set(), error: null, deleted: false };
  const client = new Client({ name: `test-client-${index}`, version: '1.0.0' });
  let notified = 0;
  // Transport errors (a GET stream refused or cut) do not fail a call: kept to explain a session
  // that never saw a notification.
  const transportErrors = [];
  client.onerror = (e) => { if (transportErrors.length < 5) transportErrors.push(String(e?.message ?? e)); };
  client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => {
    notified++;
    result.notifications++;
    if (n.params?.data?.instance) result.names.add(n.params.data.instance);
  });
  // The SDK gives up on a dropped GET stream after 2 retries (1 s, then 1.5 s): shorter than a
  // balancer restart takes on a loaded machine (a sanitizer build under the whole suite). A client
  // that means to outlive a restart asks for more.
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    reconnectionOptions: { initialReconnectionDelay: 250, maxReconnectionDelay: 2000, reconnectionDelayGrowFactor: 1.5,
                           maxRetries: 30 },
  });
  // The GET stream opens after initialize, on its own schedule (and reopens after a cut): keep
  // calling until a notification arrived on it.
  const untilNotified = async () => {
    const deadline = Date.now() + NOTIFICATION_WAIT_MS;
    while (notified === 0 && Date.now() < deadline) {
      await whoami(client, result);
      if (notified === 0) await sleep(100);
    }
    if (notified === 0) {
      throw new Error(`no notification on the GET stream (transport errors: ${JSON.stringify(transportErrors)})`);
    }
  };
  let reached = 0;  // hold points this session arrived at
  try {
    await client.connect(transport);
    result.sessionId = transport.sessionId;
    for (; reached < HOLDS; reached++) {
      await whoami(client, result);
      // A session holds only once its GET stream is open: the SDK reopens a stream that was cut,
      // but never retries a first GET that failed, as one still in flight when the test kills the
      // balancer at the hold does.
      if (reached === 0) await untilNotified();
      rounds[reached].arrive();
      await rounds[reached].released;
    }
    if (hold) notified = 0;  // from here on, a notification must come over the stream as it is now
    for (let i = HOLDS; i < calls; i++) await whoami(client, result);
    await untilNotified();
    result.finalSessionId = transport.sessionId;
    await transport.terminateSession();
    result.deleted = true;
  } catch (e) {
    result.error = `${e?.code ?? ''} ${e?.message ?? e}`.trim();
    for (; reached < HOLDS; reached++) rounds[reached].arrive();
  } finally {
    await client.close().catch(() => {});
  }
  return result;
}

const runs = Array.from({ length: sessions }, (_, i) => runSession(i));
if (hold) {
  const rl = readline.createInterface({ input: process.stdin });
  const lines = rl[Symbol.asyncIterator]();
  for (const round of rounds) {
    await round.all;
    process.stdout.write('ready\n');
    await lines.next();
    round.release();
  }
  rl.close();
}
const results = await Promise.all(runs);
const summary = { started: sessions, completed: 0, failed: 0, split: 0, calls: 0, notifications: 0, deleted: 0,
                  instances: {}, errors: [], sessions: [] };
for (const r of results) {
  summary.calls += r.calls;
  summary.notifications += r.notifications;
  if (r.names.size > 1) summary.split++;
  if (r.error) { summary.failed++; summary.errors.push(r.error); } else summary.completed++;
  if (r.deleted) summary.deleted++;
  if (r.instance) summary.instances[r.instance] = (summary.instances[r.instance] || 0) + 1;
  summary.sessions.push({ instance: r.instance, error: r.error, names: [...r.names], sessionId: r.sessionId,
                         finalSessionId: r.finalSessionId });
}
process.stdout.write(JSON.stringify(summary) + '\n');
process.exit(0);
