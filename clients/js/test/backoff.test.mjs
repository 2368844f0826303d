// The reconnect rules of PROTOCOL.md section 9 and the HTTP refusals of
// section 2, and the delays they give.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DEFAULT_BACKOFF, afterClose, afterHttpRefusal, delayFor, retryAfterFromReason } from "../dist/index.js";

test("close-code classes", () => {
  for (const code of [4000, 4001, 4002, 4003, 4009, 4099]) assert.equal(afterClose(code, "", false).action, "stop", `${code}`);
  for (const code of [4100, 4101, 4102, 4199]) assert.equal(afterClose(code, "", false).action, "backoff", `${code}`);
  for (const code of [4200, 4250, 4299]) assert.equal(afterClose(code, "", false).action, "immediate", `${code}`);
  for (const code of [1000, 1007, 1009]) assert.equal(afterClose(code, "", false).action, "stop", `${code}`);
  for (const code of [1001, 1012]) assert.equal(afterClose(code, "", false).action, "immediate", `${code}`);
  for (const code of [1006, 1011, 1013]) assert.equal(afterClose(code, "", false).action, "backoff", `${code}`);
  assert.equal(afterClose(1006, "", true).action, "stop", "a close by the app never reconnects");
});

test("4100-4199 honour retry_after_ms", () => {
  assert.equal(retryAfterFromReason("rate_limited: retry_after_ms=950"), 950);
  assert.equal(retryAfterFromReason("slow_consumer"), undefined);
  const next = afterClose(4101, "rate_limited: retry_after_ms=7000", false);
  assert.deepEqual(next, { action: "backoff", minDelayMs: 7000 });
  assert.equal(delayFor(next, 0, DEFAULT_BACKOFF, () => 0.99), 7000);
});

test("HTTP refusals", () => {
  for (const s of [400, 401, 403, 404]) assert.equal(afterHttpRefusal(s).action, "stop", `${s}`);
  for (const s of [429, 503, 500]) assert.equal(afterHttpRefusal(s).action, "backoff", `${s}`);
});

test("backoff grows exponentially to its cap, with jitter", () => {
  const o = { ...DEFAULT_BACKOFF, initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 };
  const b = { action: "backoff", minDelayMs: 0 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((n) => delayFor(b, n, o, () => 0)), [100, 200, 400, 800, 1000, 1000]);
  assert.deepEqual([0, 1, 2].map((n) => delayFor(b, n, o, () => 0.999999)), [50, 100, 200]);
  const now = delayFor({ action: "immediate" }, 5, o, () => 0.5);
  assert.equal(now, o.immediateJitterMs / 2);
  assert.equal(delayFor({ action: "stop" }, 0, o, Math.random), undefined);
});
