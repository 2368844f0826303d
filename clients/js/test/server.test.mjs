// The SDK against the real `switchboard` binary: resume, recovery through
// history, keyed resend across a server restart, token refresh, and what
// the client does after each kind of close or HTTP refusal.
import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import { Client, ClosedError, TimeoutError } from "../dist/index.js";
import { SECRET, Server, TEST_TIMEOUT_MS, instrumented, mint, nextState, stopAll, until, within } from "./harness.mjs";

/** Fast reconnects: the tests wait for them. */
const FAST = { initialMs: 50, maxMs: 400, immediateJitterMs: 50 };

/** Every client of the current test, closed after it whatever happened. */
const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
  stopAll();
});

function client(server, user, extra = {}) {
  const spy = instrumented();
  const c = new Client({ url: server.url, user, WebSocket: spy.WebSocket, backoff: FAST, ...extra });
  clients.push(c);
  return { c, spy };
}

/** Collects a room's messages as the app sees them. */
function collect(room) {
  const seen = [];
  room.on("message", (m) => seen.push(m));
  return seen;
}

function assertInOrderOnce(seen, texts) {
  assert.deepEqual(seen.map((m) => m.body.text), texts);
  for (let i = 1; i < seen.length; i++) assert.equal(seen[i].seq, seen[i - 1].seq + 1, "contiguous seqs");
}

const texts = (prefix, n) => Array.from({ length: n }, (_, i) => `${prefix}${i}`);

test("resume: a reconnect replays what was missed, once and in order", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice");
  const bob = client(server, "bob");
  try {
    const ra = alice.c.room("general");
    const seen = collect(ra);
    await ra.join();
    const rb = bob.c.room("general");
    await rb.join();
    for (const t of texts("a", 3)) await rb.send({ text: t });
    await until("alice sees the first three", () => seen.length === 3);

    // Alice's connection breaks; she cannot reconnect until Bob has sent more.
    alice.spy.blocked = true;
    alice.spy.sever();
    await nextState(alice.c, (s) => s.state === "disconnected");
    for (const t of texts("b", 4)) await rb.send({ text: t });
    alice.spy.blocked = false;
    await nextState(alice.c, (s) => s.state === "connected" && s.resumed);
    await until("alice sees all seven", () => seen.length === 7);

    assertInOrderOnce(seen, [...texts("a", 3), ...texts("b", 4)]);
    const join = alice.spy.sent.filter((f) => f.type === "join").at(-1);
    assert.equal(join.since, seen[2].seq, "the resume names the last seq seen");
    assert.equal(typeof join.epoch, "string");
    const joined = alice.spy.frames.filter((f) => f.type === "joined").at(-1);
    assert.equal(joined.recovered, true);
    assert.equal(alice.spy.frames.filter((f) => f.type === "message" && f.replay).length, 4, "the four came as replay");
  } finally {
    alice.c.close();
    bob.c.close();
    await server.dispose();
  }
});

test("recovery through history: recovered:false is paged, so nothing is missed", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server({ flags: ["--replay-cap", "3"] }).start();
  const alice = client(server, "alice", { gapPageSize: 4 });
  const bob = client(server, "bob");
  try {
    const ra = alice.c.room("general");
    const seen = collect(ra);
    await ra.join();
    const rb = bob.c.room("general");
    await rb.join();
    await rb.send({ text: "before" });
    await until("alice sees the first", () => seen.length === 1);

    alice.spy.blocked = true;
    alice.spy.sever();
    await nextState(alice.c, (s) => s.state === "disconnected");
    for (const t of texts("m", 10)) await rb.send({ text: t });
    // Bob keeps sending while Alice pages the gap: her first page is held
    // until his messages reached her live, so the later pages hold them too.
    alice.spy.hold = (f) => f.type === "history";
    alice.spy.blocked = false;
    await until("alice asks for the first page", () => alice.spy.held.length === 1);
    for (const t of texts("live", 5)) await rb.send({ text: t });
    await until("alice got them live", () => alice.spy.frames.filter((f) => f.type === "message" && f.body.text.startsWith("live")).length === 5);
    alice.spy.hold = null;
    alice.spy.release();
    await until("alice sees everything", () => seen.length === 16);
    await until("alice's room is joined again", () => ra.status === "joined");

    assertInOrderOnce(seen, ["before", ...texts("m", 10), ...texts("live", 5)]);
    assert.ok(alice.spy.frames.some((f) => f.type === "joined" && f.recovered === false), "the server said recovered:false");
    const pages = alice.spy.sent.filter((f) => f.type === "history");
    assert.ok(pages.length >= 3, `the gap was paged (${pages.length} history requests)`);
    assert.equal(pages[0].after, seen[0].seq);
  } finally {
    alice.c.close();
    bob.c.close();
    await server.dispose();
  }
});

test("a gap longer than maxGapFill is reported, and the rest delivered", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server({ flags: ["--replay-cap", "2"] }).start();
  const alice = client(server, "alice", { maxGapFill: 4 });
  const bob = client(server, "bob");
  try {
    const ra = alice.c.room("general");
    const seen = collect(ra);
    const gaps = [];
    ra.on("gap", (g) => gaps.push(g));
    await ra.join();
    const rb = bob.c.room("general");
    await rb.join();
    alice.spy.blocked = true;
    alice.spy.sever();
    await nextState(alice.c, (s) => s.state === "disconnected");
    const acks = [];
    for (const t of texts("m", 10)) acks.push(await rb.send({ text: t }));
    alice.spy.blocked = false;
    await until("alice sees the last four", () => seen.length === 4);
    assert.deepEqual(gaps, [{ room: "general", fromSeq: acks[0].seq, toSeq: acks[5].seq, reason: "too_long" }]);
    assertInOrderOnce(seen, texts("m", 10).slice(6));
  } finally {
    alice.c.close();
    bob.c.close();
    await server.dispose();
  }
});

test("an unacked send is resent with its key and stored once", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice");
  try {
    const ra = alice.c.room("general");
    const seen = collect(ra);
    await ra.join();
    // The first ack is lost with the connection: the client cannot know
    // the message was stored, so it resends it, with the same key.
    let dropped = 0;
    alice.spy.dropIncoming = (f) => (f.type === "ack" || f.type === "message") && dropped++ < 2;
    const sending = ra.send({ text: "once" });
    await until("the server stored it", () => alice.spy.frames.some((f) => f.type === "ack"));
    alice.spy.dropIncoming = null;
    alice.spy.sever();
    const ack = await sending;
    assert.equal(ack.duplicate, true, "the resend matched the stored message");
    const sends = alice.spy.sent.filter((f) => f.type === "send");
    assert.equal(sends.length, 2);
    assert.equal(sends[0].key, sends[1].key);
    const page = await ra.history();
    assert.deepEqual(page.messages.map((m) => m.body.text), ["once"]);
    await until("alice sees it, through the resume", () => seen.length === 1);
    assert.equal(seen[0].seq, ack.seq);
  } finally {
    alice.c.close();
    await server.dispose();
  }
});

test("keyed resend across a server restart: every send stored once, every message seen once", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice");
  const bob = client(server, "bob");
  try {
    const ra = alice.c.room("general");
    const rb = bob.c.room("general");
    const seenA = collect(ra);
    const seenB = collect(rb);
    await ra.join();
    await rb.join();
    const N = 40;
    const acks = [];
    for (let i = 0; i < N; i++) {
      acks.push(ra.send({ text: `a${i}` }));
      acks.push(rb.send({ text: `b${i}` }));
      if (i === N / 2) {
        // SIGKILL in the middle of the stream, then the same port and data dir.
        await server.stop("SIGKILL");
        await server.start();
      }
    }
    const done = await Promise.all(acks);
    assert.ok(alice.spy.sockets.length >= 2 && bob.spy.sockets.length >= 2, "both reconnected");
    const page = await ra.history({ limit: 200 });
    const bodies = page.messages.map((m) => m.body.text);
    assert.equal(bodies.length, 2 * N, "each send stored once");
    assert.equal(new Set(bodies).size, 2 * N);
    assert.deepEqual(new Set(done.map((a) => a.seq)).size, 2 * N, "every ack names its own seq");
    await until("both see everything", () => seenA.length === 2 * N && seenB.length === 2 * N);
    assert.deepEqual(seenA.map((m) => m.seq), page.messages.map((m) => m.seq));
    assert.deepEqual(seenB.map((m) => m.seq), page.messages.map((m) => m.seq));
    assert.deepEqual(seenA.map((m) => m.body.text), bodies);
  } finally {
    alice.c.close();
    bob.c.close();
    await server.dispose();
  }
});

const AUTH = `auth_hs256_secret = "${SECRET}"\nauth_leeway_secs = 0\n`;
const now = () => Math.floor(Date.now() / 1000);

test("token refresh: the provider is asked again on token_expiring and the session outlives the first token", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server({ toml: AUTH }).start();
  const exps = [];
  const token = () => {
    // The first token expires in 5 s, inside the server's 60 s warning.
    const exp = now() + (exps.length === 0 ? 5 : 3600);
    exps.push(exp);
    return mint({ sub: "alice", exp, grants: ["*:rw"] });
  };
  const alice = client(server, undefined, { token });
  try {
    const refreshed = new Promise((ok) => alice.c.on("refreshed", ok));
    const ra = alice.c.room("general");
    await ra.join();
    assert.equal(await within("refreshed", refreshed), exps[1]);
    assert.equal(exps.length, 2, "asked at connect and on token_expiring");
    const refresh = alice.spy.sent.find((f) => f.type === "refresh");
    assert.ok(refresh.token.length > 0);
    assert.equal(alice.spy.sent[0].type, "auth", "the token goes in the first frame, not the URL");
    assert.ok(!alice.spy.sockets[0].url.includes("token"));
    // Past the first token's expiry the session is still the same one.
    await new Promise((r) => setTimeout(r, (exps[0] - now() + 1) * 1000));
    const ack = await ra.send({ text: "after the first token expired" });
    assert.ok(ack.seq > 0);
    assert.equal(alice.spy.sockets.length, 1, "no reconnect was needed");
  } finally {
    alice.c.close();
    await server.dispose();
  }
});

test("close 4001 (refused token) stops and tells the app", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server({ toml: AUTH }).start();
  const alice = client(server, undefined, { token: () => mint({ sub: "alice", exp: now() + 60 }, "wrong-secret-wrong-secret-wrong-secret!") });
  try {
    const s = await nextState(alice.c, (s) => s.state === "disconnected");
    assert.equal(s.reason.code, 4001);
    assert.match(s.reason.reason, /unauthorized/);
    assert.equal(s.willReconnect, false);
  } finally {
    alice.c.close();
    await server.dispose();
  }
});

test("close 4101 (rate limited) backs off at least retry_after_ms", { timeout: TEST_TIMEOUT_MS }, async () => {
  const toml = `${AUTH}send_rate_per_session = { per_sec = 1, burst = 1 }\nsend_rate_per_user = { per_sec = 0, burst = 0 }\nrate_limit_strikes = 2\n`;
  const server = await new Server({ toml }).start();
  const alice = client(server, undefined, { token: () => mint({ sub: "alice", exp: now() + 600, grants: ["*:rw"] }) });
  try {
    const ra = alice.c.room("general");
    await ra.join();
    const closed = nextState(alice.c, (s) => s.state === "disconnected");
    // Raw frames past the SDK, which itself would wait out `rate_limited`.
    const ws = alice.spy.sockets[0];
    for (let i = 0; i < 5; i++) ws.send(JSON.stringify({ type: "send", room: "general", body: i }));
    const s = await closed;
    assert.equal(s.reason.code, 4101);
    const m = /retry_after_ms=(\d+)/.exec(s.reason.reason);
    assert.ok(m, `the reason carries retry_after_ms: ${s.reason.reason}`);
    assert.equal(s.willReconnect, true);
    assert.ok(s.delayMs >= Number(m[1]), `waits ${s.delayMs} >= ${m[1]}`);
  } finally {
    alice.c.close();
    await server.dispose();
  }
});

test("close 1001 (server shutting down) reconnects at once and resumes", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice");
  try {
    await alice.c.room("general").join();
    const closed = nextState(alice.c, (s) => s.state === "disconnected");
    await server.stop("SIGTERM");
    const s = await closed;
    assert.equal(s.reason.code, 1001);
    assert.equal(s.willReconnect, true);
    assert.ok(s.delayMs < FAST.immediateJitterMs, `at once: ${s.delayMs} ms`);
    await server.start();
    await nextState(alice.c, (s) => s.state === "connected" && s.resumed);
  } finally {
    alice.c.close();
    await server.dispose();
  }
});

test("HTTP 401 stops; HTTP 503 backs off", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server({ flags: ["--max-connections", "1"] }).start();
  const nobody = client(server, undefined);
  let alice;
  let bob;
  try {
    const s401 = await nextState(nobody.c, (s) => s.state === "disconnected");
    assert.equal(s401.reason.httpStatus, 401);
    assert.equal(s401.willReconnect, false);

    alice = client(server, "alice");
    await nextState(alice.c, (s) => s.state === "connected");
    bob = client(server, "bob");
    const s503 = await nextState(bob.c, (s) => s.state === "disconnected");
    assert.equal(s503.reason.httpStatus, 503);
    assert.equal(s503.willReconnect, true);
    // Once Alice leaves, Bob's backoff gets him in.
    alice.c.close();
    await nextState(bob.c, (s) => s.state === "connected");
  } finally {
    nobody.c.close();
    alice?.c.close();
    bob?.c.close();
    await server.dispose();
  }
});

test("HTTP 429 (per-user limit) backs off", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server({ toml: `${AUTH}max_connections_per_user = 1\n` }).start();
  const token = () => mint({ sub: "alice", exp: now() + 600, grants: ["*:rw"] });
  const first = client(server, undefined, { token });
  let second;
  try {
    await nextState(first.c, (s) => s.state === "connected");
    // With the token in the URL the refusal is an HTTP answer (with an
    // `auth` frame it would be close 1013 after the upgrade).
    const url = `${server.url}?token=${token()}`;
    const spy = instrumented();
    second = new Client({ url, WebSocket: spy.WebSocket, backoff: FAST });
    clients.push(second);
    const s = await nextState(second, (s) => s.state === "disconnected");
    assert.equal(s.reason.httpStatus, 429);
    assert.equal(s.willReconnect, true);
  } finally {
    first.c.close();
    second?.close();
    await server.dispose();
  }
});

test("presence and typing", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice", { typingThrottleMs: 60_000 });
  const bob = client(server, "bob");
  try {
    const ra = alice.c.room("general");
    await ra.join();
    assert.deepEqual([...ra.members], ["alice"]);
    const rb = bob.c.room("general");
    await rb.join();
    assert.deepEqual([...rb.members].sort(), ["alice", "bob"]);
    await until("alice sees bob arrive", () => ra.members.has("bob"));
    assert.equal(ra.memberCount, 2);
    const first = await ra.memberPage({ limit: 1 });
    assert.deepEqual(first, { count: 2, users: ["alice"], more: true });
    const rest = await ra.memberPage({ after: "alice", limit: 1 });
    assert.deepEqual(rest, { count: 2, users: ["bob"], more: false });

    const typing = [];
    rb.on("typing", (u) => typing.push(u));
    ra.typing();
    ra.typing(); // throttled: one notice
    await until("bob sees alice typing", () => typing.length === 1);
    assert.equal(alice.spy.sent.filter((f) => f.type === "typing").length, 1);

    bob.c.close();
    await until("alice sees bob go", () => !ra.members.has("bob"));
    assert.equal(ra.memberCount, 1);
  } finally {
    alice.c.close();
    bob.c.close();
    await server.dispose();
  }
});

test("close() rejects what is pending with ClosedError", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice");
  try {
    const ra = alice.c.room("general");
    await ra.join();
    alice.spy.blocked = true;
    alice.spy.sever();
    await nextState(alice.c, (s) => s.state === "disconnected");
    const queued = ra.send({ text: "never sent" });
    alice.c.close();
    await assert.rejects(within("the rejection", queued), (e) => e instanceof ClosedError);
    assert.equal(alice.c.pendingSends, 0);
    await assert.rejects(ra.send({ text: "after close" }), (e) => e instanceof ClosedError);
  } finally {
    alice.c.close();
    await server.dispose();
  }
});

test("a request without a reply rejects with TimeoutError", { timeout: TEST_TIMEOUT_MS }, async () => {
  const server = await new Server().start();
  const alice = client(server, "alice", { requestTimeoutMs: 300 });
  try {
    await nextState(alice.c, (s) => s.state === "connected");
    assert.ok((await alice.c.ping()) >= 0, "a pong in time");
    alice.spy.hold = (f) => f.type === "pong";
    await assert.rejects(alice.c.ping(), (e) => e instanceof TimeoutError && e.afterMs === 300);
  } finally {
    alice.c.close();
    await server.dispose();
  }
});
