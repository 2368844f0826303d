// The SDK's reconnect and retry policy against protocol/reconnect-policy.json,
// the table PROTOCOL.md sections 5, 9 and 11 refer to: every exact entry,
// codes across every range, the HTTP statuses, the error codes and the
// default delays. The Rust client is checked against the same file
// (client/tests/policy.rs), so the two cannot disagree.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { createServer } from "node:http";
import { WebSocketServer } from "ws";
import {
  Client, DEFAULT_BACKOFF, PROTOCOL_VERSION, afterClose, afterHttpRefusal, delayFor, parseRetryAfter, retryDelay, retryForError,
} from "../dist/index.js";
import { WsWebSocket } from "./harness.mjs";

const POLICY = JSON.parse(readFileSync(fileURLToPath(new URL("../../../protocol/reconnect-policy.json", import.meta.url)), "utf8"));

/** A few values of `from..to`: both ends, the middle, and some between. */
function samples(from, to) {
  return [...new Set(Array.from({ length: 9 }, (_, i) => from + Math.floor(((to - from) * i) / 8)))];
}

/** Checks `f` on every exact entry and on samples of every range; returns how many were checked. */
function checkTable(table, exact, key, f) {
  let checked = 0;
  for (const e of table[exact]) {
    assert.equal(f(e[key]), e.action, `${key} ${e[key]}`);
    checked++;
  }
  const listed = new Set(table[exact].map((e) => e[key]));
  for (const r of table.ranges) {
    assert.ok(r.from <= r.to, `range ${r.from}-${r.to}`);
    for (const n of samples(r.from, r.to)) {
      if (listed.has(n)) continue;
      assert.equal(f(n), r.action, `${key} ${n} (range ${r.from}-${r.to})`);
      checked++;
    }
  }
  return checked;
}

test("close codes follow the policy table", () => {
  const checked = checkTable(POLICY.close, "codes", "code", (code) => afterClose(code, "", false).action);
  assert.ok(checked > 50, `only ${checked} close codes checked`);
  // A close the application made never reconnects, whatever the code.
  assert.equal(afterClose(1006, "", true).action, "stop");
});

test("the close ranges cover every code once", () => {
  const covered = new Uint8Array(65536);
  for (const r of POLICY.close.ranges) for (let n = r.from; n <= r.to; n++) covered[n]++;
  assert.ok(covered.every((c) => c === 1), "a close code is in no range, or in two");
});

test("a retry_after_ms in a backoff close reason is a floor", () => {
  const r = POLICY.close.retry_after_in_reason;
  assert.equal(r.use, "floor");
  for (const code of samples(r.from, r.to)) {
    const next = afterClose(code, "slow down; retry_after_ms=9000", false);
    assert.deepEqual(next, { action: "backoff", minDelayMs: 9000 }, `close ${code}`);
    assert.equal(delayFor(next, 0, DEFAULT_BACKOFF, () => 0.5), 9000);
  }
  assert.deepEqual(afterClose(1013, "retry_after_ms=9000", false), { action: "backoff", minDelayMs: 0 }, "read in 4100-4199 only");
});

test("HTTP statuses follow the policy table, Retry-After a floor", () => {
  const checked = checkTable(POLICY.http, "statuses", "status", (s) => afterHttpRefusal(s).action);
  assert.ok(checked > 20, `only ${checked} statuses checked`);
  assert.equal(POLICY.http.retry_after_header.use, "floor");
  assert.equal(POLICY.http.retry_after_header.unit, "seconds");
  const next = afterHttpRefusal(503, parseRetryAfter("7"));
  assert.deepEqual(next, { action: "backoff", minDelayMs: 7000 });
  assert.equal(delayFor(next, 0, DEFAULT_BACKOFF, () => 0), 7000);
  assert.equal(parseRetryAfter("Wed, 01 Jan 2025 00:00:10 GMT", Date.parse("Wed, 01 Jan 2025 00:00:00 GMT")), 10_000);
  assert.equal(parseRetryAfter("soon"), undefined);
});

test("error codes follow the policy table", () => {
  for (const e of POLICY.errors) {
    const want = e.retry ? e.delay : undefined;
    assert.equal(retryForError(e.code), want, e.code);
    const d = retryDelay(e.code, 1234, 1, DEFAULT_BACKOFF, () => 0);
    if (!e.retry) assert.equal(d, undefined, e.code);
    else if (e.delay === "retry_after_ms") assert.equal(d, 1234, e.code);
    else assert.equal(d, DEFAULT_BACKOFF.initialMs, e.code);
  }
  // Without retry_after_ms, a step that grows with the request's refusals.
  assert.equal(retryDelay("unavailable", undefined, 3, DEFAULT_BACKOFF, () => 0), 4 * DEFAULT_BACKOFF.initialMs);
});

test("default delays, the lost connection and the version rule are the table's", () => {
  const d = POLICY.delays;
  assert.deepEqual(
    { initialMs: d.initial_ms, maxMs: d.max_ms, factor: d.multiplier, jitter: d.jitter, immediateJitterMs: d.immediate_max_ms },
    DEFAULT_BACKOFF,
  );
  const steps = Array.from({ length: 8 }, (_, n) => delayFor({ action: "backoff", minDelayMs: 0 }, n, DEFAULT_BACKOFF, () => 0));
  assert.deepEqual(steps, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
  // A connection that broke without a close frame is close 1006.
  assert.equal(afterClose(1006, "", false).action, POLICY.lost.action);
  assert.equal(POLICY.protocol, PROTOCOL_VERSION);
  assert.equal(POLICY.version_mismatch.action, "stop");
});

// The two rules a real server cannot be made to exercise: another protocol
// version, and a Retry-After on a refused upgrade (the server sends none
// today). A few lines of `ws` and `node:http` play that server.

test("a welcome of another protocol version closes with 1000 and stops", { timeout: 20_000 }, async () => {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((ok) => wss.once("listening", ok));
  const closed = new Promise((ok) => {
    wss.on("connection", (ws) => {
      ws.send(JSON.stringify({ type: "welcome", session: "s", user: "alice", heartbeat_ms: 25000, server: "future", protocol: PROTOCOL_VERSION + 1 }));
      ws.on("close", (code) => ok(code));
    });
  });
  const c = new Client({ url: `ws://127.0.0.1:${wss.address().port}/ws`, user: "alice", WebSocket: WsWebSocket });
  try {
    const s = await new Promise((ok) => c.on("state", (s) => { if (s.state === "disconnected") ok(s); }));
    assert.equal(s.willReconnect, false);
    assert.equal(s.reason.protocol, PROTOCOL_VERSION + 1);
    assert.equal(await closed, 1000);
  } finally {
    c.close();
    await new Promise((ok) => wss.close(ok));
  }
});

test("a Retry-After on a refused upgrade is a floor under the backoff", { timeout: 20_000 }, async () => {
  const server = createServer();
  server.on("upgrade", (_req, socket) => {
    socket.end("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy");
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  const c = new Client({ url: `ws://127.0.0.1:${server.address().port}/ws`, user: "alice", WebSocket: WsWebSocket, backoff: { initialMs: 50, maxMs: 100 } });
  try {
    const s = await new Promise((ok) => c.on("state", (s) => { if (s.state === "disconnected") ok(s); }));
    assert.equal(s.reason.httpStatus, 503);
    assert.equal(s.reason.retryAfterMs, 7000);
    assert.equal(s.willReconnect, true);
    assert.ok(s.delayMs >= 7000, `waits ${s.delayMs} ms`);
  } finally {
    c.close();
    await new Promise((ok) => server.close(ok));
  }
});

test("a join refused with unavailable goes out again after retry_after_ms", { timeout: 20_000 }, async () => {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((ok) => wss.once("listening", ok));
  const joins = [];
  wss.on("connection", (ws) => {
    ws.send(JSON.stringify({ type: "welcome", session: "s", user: "alice", heartbeat_ms: 25000, server: "fake", protocol: PROTOCOL_VERSION }));
    ws.on("message", (data) => {
      const f = JSON.parse(String(data));
      if (f.type !== "join") return;
      joins.push(f);
      const reply = joins.length === 1
        ? { type: "error", id: f.id, code: "unavailable", message: "the stream cannot be read now", retry_after_ms: 30 }
        : { type: "joined", id: f.id, room: f.room, seq: 0, epoch: "e", count: 1, presence: ["alice"] };
      ws.send(JSON.stringify(reply));
    });
  });
  const c = new Client({ url: `ws://127.0.0.1:${wss.address().port}/ws`, user: "alice", WebSocket: WsWebSocket });
  try {
    const room = c.room("general");
    await room.join();
    assert.equal(room.status, "joined");
    assert.equal(joins.length, 2, "one refusal, one retry");
    assert.equal(c.current.state, "connected", "on the same connection");
  } finally {
    c.close();
    await new Promise((ok) => wss.close(ok));
  }
});
