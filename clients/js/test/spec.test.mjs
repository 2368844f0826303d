// Every JSON example of protocol/PROTOCOL.md, checked against the SDK's
// runtime validators of its TypeScript frame types (as protocol/tests/spec.rs
// checks them against the Rust wire types): each `json client` block is a
// valid client frame, each `json server` block a valid server frame, and
// each `json client-invalid` block is refused.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { validateClientFrame, validateServerFrame } from "../dist/index.js";

const SPEC = fileURLToPath(new URL("../../../protocol/PROTOCOL.md", import.meta.url));

/** The fenced ```json <kind> blocks of the spec, in order. */
function examples() {
  const text = readFileSync(SPEC, "utf8");
  const out = [];
  const re = /^```json ([a-z-]+)(?: ([a-z_]+))?\n([\s\S]*?)^```$/gm;
  for (const m of text.matchAll(re)) out.push({ kind: m[1], code: m[2], text: m[3].trim() });
  return out;
}

test("every client example is a client frame", () => {
  const blocks = examples().filter((b) => b.kind === "client");
  assert.ok(blocks.length >= 10, `found only ${blocks.length} client examples`);
  for (const b of blocks) assert.deepEqual(validateClientFrame(JSON.parse(b.text)), [], b.text);
});

test("every server example is a server frame", () => {
  const blocks = examples().filter((b) => b.kind === "server");
  assert.ok(blocks.length >= 15, `found only ${blocks.length} server examples`);
  for (const b of blocks) assert.deepEqual(validateServerFrame(JSON.parse(b.text)), [], b.text);
});

test("every invalid client example is refused", () => {
  const blocks = examples().filter((b) => b.kind === "client-invalid");
  assert.ok(blocks.length >= 3);
  for (const b of blocks) {
    let v;
    try {
      v = JSON.parse(b.text);
    } catch {
      continue; // not JSON at all: refused before any type applies
    }
    assert.notDeepEqual(validateClientFrame(v), [], `accepted ${b.text}`);
  }
});

test("every frame type of the SDK has an example in the spec", () => {
  const all = examples().filter((b) => b.kind === "client" || b.kind === "server");
  const seen = new Set(all.map((b) => `${b.kind}:${JSON.parse(b.text).type}`));
  const client = ["auth", "refresh", "join", "leave", "send", "history", "typing", "ping"];
  const server = ["welcome", "joined", "left", "ack", "message", "history", "typing", "presence",
    "token_expiring", "refreshed", "pong", "error"];
  for (const t of client) assert.ok(seen.has(`client:${t}`), `no client example of ${t}`);
  for (const t of server) assert.ok(seen.has(`server:${t}`), `no server example of ${t}`);
});

test("the validators refuse what the types do not allow", () => {
  assert.notDeepEqual(validateServerFrame({ type: "ack", room: "r", seq: -1, ts: 1 }), []);
  assert.notDeepEqual(validateServerFrame({ type: "message", room: "r", seq: 1, from: "a", ts: 1 }), []);
  assert.notDeepEqual(validateServerFrame({ type: "joined", room: "r", seq: 1, epoch: 7 }), []);
  assert.notDeepEqual(validateServerFrame({ type: "error", code: "rate_limited", message: "x" }), []);
  assert.notDeepEqual(validateServerFrame([]), []);
  assert.notDeepEqual(validateClientFrame({ type: "dance" }), []);
  assert.notDeepEqual(validateClientFrame({ type: "send", room: "r", body: { n: Infinity } }), []);
  assert.deepEqual(validateServerFrame({ type: "pong", id: 1, extra: "unknown fields are allowed" }), []);
});
