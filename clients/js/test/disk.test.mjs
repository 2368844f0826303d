// The SDK's sends while the server cannot store messages: a full disk (a
// real tmpfs of a few MiB, mounted for the test as tests/it/disk.rs does;
// the tests run as root, and a test that cannot mount fails) makes the
// store answer `unavailable`. Every send made meanwhile must be acked once
// when space is back, and the application must never see an error.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, statfsSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client } from "../dist/index.js";
import { DEADLINE_MS, Server, TEST_TIMEOUT_MS, WsWebSocket, instrumented, stopAll, until, within } from "./harness.mjs";

/** Padding of each body, as the Rust disk tests': it needs space the full disk lacks. */
const PAD = "x".repeat(3000);
/** Free space left beside the store before the sends begin. */
const HEADROOM = 1 << 20;
/** Sends the application makes while the store answers `unavailable`. */
const WHILE_FULL = 4;

after(stopAll);

/** A tmpfs on a fresh temp dir, with filler files to take its space. */
class Tmpfs {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "switchboard-sdk-disk-"));
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", this.dir]);
    this.fillers = 0;
  }

  /** Writes another filler file, so that `left` bytes stay free. */
  fillLeaving(left) {
    const st = statfsSync(this.dir);
    const size = Math.max(0, st.bavail * st.bsize - left);
    writeFileSync(join(this.dir, `filler${this.fillers++}`), Buffer.alloc(size));
  }

  freeFillers() {
    for (let n = 0; n < this.fillers; n++) rmSync(join(this.dir, `filler${n}`));
    this.fillers = 0;
  }

  unmount() {
    try {
      execFileSync("umount", [this.dir]);
    } catch {
      execFileSync("umount", ["-l", this.dir]);
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A bare protocol session: requests and their replies, nothing else. */
async function rawSession(url) {
  const ws = new WsWebSocket(url);
  const waiting = new Map();
  let next = 1;
  ws.on("message", (data) => {
    const f = JSON.parse(String(data));
    if (f.id !== undefined && waiting.has(f.id)) {
      waiting.get(f.id)(f);
      waiting.delete(f.id);
    }
  });
  await within("bob's connection", new Promise((ok, fail) => { ws.once("open", ok); ws.once("error", fail); }));
  const request = (frame) => {
    const id = next++;
    const reply = new Promise((ok) => waiting.set(id, ok));
    ws.send(JSON.stringify({ ...frame, id }));
    return within(`reply to ${frame.type}`, reply);
  };
  return { ws, request };
}

test("sends refused as unavailable are acked once each when the store recovers, and never fail", { timeout: TEST_TIMEOUT_MS }, async () => {
  const disk = new Tmpfs();
  const server = new Server({ dataDir: join(disk.dir, "data"), toml: "store_retry_ms = 2000\nstore_cache_bytes = 1048576\n" });
  let alice;
  let bob;
  try {
    await server.start();
    const spy = instrumented();
    alice = new Client({ url: server.url, user: "alice", WebSocket: spy.WebSocket, backoff: { initialMs: 50, maxMs: 400 } });
    const room = alice.room("disk");
    const seen = [];
    room.on("message", (m) => seen.push(m));
    const errors = [];
    alice.on("error", (e) => errors.push(e));
    await room.join();

    // Bob fills the disk: he sends until the store refuses, then the last
    // of the space goes to a second filler.
    bob = await rawSession(`${server.url}?user=bob`);
    assert.equal((await bob.request({ type: "join", room: "disk" })).type, "joined");
    disk.fillLeaving(HEADROOM);
    let storedByBob = 0;
    for (;;) {
      const reply = await bob.request({ type: "send", room: "disk", key: `bob-${storedByBob}`, body: { who: "bob", i: storedByBob, pad: PAD } });
      if (reply.type === "error" && reply.code === "unavailable") break;
      assert.equal(reply.type, "ack", JSON.stringify(reply));
      storedByBob++;
      assert.ok(storedByBob < 5000, "the disk never filled");
    }
    disk.fillLeaving(0);

    // Alice's sends while the store refuses: each is refused on the wire at
    // least once, and none settles, with an error or otherwise.
    const settled = new Array(WHILE_FULL).fill(false);
    const sends = Array.from({ length: WHILE_FULL }, (_, i) => {
      const p = room.send({ who: "alice", i, pad: PAD }, { key: `alice-${i}` });
      p.then(() => { settled[i] = "acked"; }, (e) => { settled[i] = e; });
      return p;
    });
    const refusedKeys = () => {
      const keyOf = new Map(spy.sent.filter((f) => f.type === "send").map((f) => [f.id, f.key]));
      return new Set(spy.frames.filter((f) => f.type === "error" && f.code === "unavailable").map((f) => keyOf.get(f.id)));
    };
    await until("every send of alice refused once", () => Array.from({ length: WHILE_FULL }, (_, i) => `alice-${i}`).every((k) => refusedKeys().has(k)));
    assert.deepEqual(settled, new Array(WHILE_FULL).fill(false), "nothing settles while the disk is full");
    assert.equal(alice.current.state, "connected", "a refusal is no reason to reconnect");

    // Space comes back: every send is acked, once, with no error anywhere.
    disk.freeFillers();
    const acks = await within("every send acked once the store recovered", Promise.all(sends), DEADLINE_MS);
    for (const a of acks) assert.equal(a.duplicate, false, "nothing of it was stored before");
    assert.equal(new Set(acks.map((a) => a.seq)).size, WHILE_FULL, "one seq each");
    assert.deepEqual(errors, [], "the application saw no error");
    const resent = spy.sent.filter((f) => f.type === "send");
    assert.ok(resent.length > WHILE_FULL, "the refused sends went out again");
    for (const f of resent) assert.match(f.key, /^alice-\d$/, "every resend carries its key");

    // The history holds each of alice's messages once, at its acked seq.
    const history = [];
    for (;;) {
      const after = history.at(-1)?.seq ?? 0;
      const page = await bob.request({ type: "history", room: "disk", after, limit: 200 });
      history.push(...page.messages);
      if (!page.more || page.messages.length === 0) break;
    }
    const alices = history.filter((m) => m.body.who === "alice").map((m) => [m.body.i, m.seq]).sort((a, b) => a[0] - b[0]);
    assert.deepEqual(alices, acks.map((a, i) => [i, a.seq]));
    assert.equal(history.length, storedByBob + WHILE_FULL, "bob's refused send not stored, nothing twice");

    // And alice received each live, once and in order.
    await until("alice sees every message", () => seen.length === storedByBob + WHILE_FULL);
    for (let i = 1; i < seen.length; i++) assert.equal(seen[i].seq, seen[i - 1].seq + 1, "contiguous seqs");
  } finally {
    alice?.close();
    bob?.ws.terminate();
    await server.dispose();
    disk.unmount();
  }
});
