// The real server for the SDK's tests: the `switchboard` binary, spawned on
// a free loopback port with a temp data dir, stopped by its PID. Nothing
// here is mocked: the tests talk to the same binary users run.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createHmac } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { WebSocket as WsWebSocket } from "ws";

/** Every wait in these tests is bounded by this. */
export const DEADLINE_MS = 20_000;
/** No test runs longer than this. */
export const TEST_TIMEOUT_MS = 60_000;

const BIN = process.env.SWITCHBOARD_BIN ?? (fileURLToPath(new URL("../../../target/debug/switchboard", import.meta.url)));

/** Every server started and not yet stopped: `stopAll` ends them. */
const running = new Set();

/** SIGKILLs every server still running (a test that timed out left it). */
export function stopAll() {
  for (const child of running) {
    try { process.kill(child.pid, "SIGKILL"); } catch { /* already gone */ }
  }
  running.clear();
}
process.on("exit", stopAll);

export class Server {
  /** `flags`: extra `serve` flags; `toml`: a config file's text;
   * `dataDir`: where the store lives (default: in the server's temp dir). */
  constructor({ flags = [], toml = "", dataDir = undefined } = {}) {
    if (!existsSync(BIN)) {
      throw new Error(`no server binary at ${BIN}: run \`cargo build --bin switchboard\` or set SWITCHBOARD_BIN`);
    }
    this.dir = mkdtempSync(join(tmpdir(), "switchboard-sdk-"));
    this.flags = flags;
    this.toml = toml;
    this.dataDir = dataDir ?? join(this.dir, "data");
    this.port = 0;
    this.child = null;
  }

  /** Starts (or restarts, on the same port and data dir); resolves once it listens. */
  async start() {
    const config = join(this.dir, "switchboard.toml");
    writeFileSync(config, this.toml);
    const args = [
      "serve", "--config", config, "--no-tls", "--plain-listen", `127.0.0.1:${this.port}`,
      "--data-dir", this.dataDir, "--admin-listen", "127.0.0.1:0", ...this.flags,
    ];
    const child = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "warn" } });
    this.child = child;
    running.add(child);
    child.once("exit", () => running.delete(child));
    this.stderr = "";
    child.stderr.on("data", (d) => { this.stderr += d; });
    const addr = await new Promise((ok, fail) => {
      let out = "";
      const timer = setTimeout(() => fail(new Error(`server did not start: ${this.stderr}`)), DEADLINE_MS);
      child.stdout.on("data", (d) => {
        out += d;
        const m = /listening on ws:\/\/([\d.]+:\d+)\/ws/.exec(out);
        if (m) { clearTimeout(timer); ok(m[1]); }
      });
      child.on("exit", (code) => { clearTimeout(timer); fail(new Error(`server exited (${code}): ${this.stderr}`)); });
    });
    this.port = Number(addr.split(":")[1]);
    this.url = `ws://${addr}/ws`;
    return this;
  }

  /** Sends `signal` to the server's PID and waits for it to exit. */
  async stop(signal = "SIGKILL") {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((ok) => child.once("exit", ok));
    process.kill(child.pid, signal);
    await exited;
    this.child = null;
  }

  async dispose() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export const SECRET = "sdk-tests-secret-0123456789abcdef0123456789";

/** An HS256 token, as `switchboard token` mints it. */
export function mint(claims, secret = SECRET) {
  const b64 = (x) => Buffer.from(JSON.stringify(x)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

/**
 * The `ws` WebSocket, with the test's hands on it: every instance is
 * recorded with the frames it received, `blocked` makes new connections
 * fail at once, and `dropIncoming` hides received frames from the client.
 */
export function instrumented() {
  const spy = { sockets: [], frames: [], sent: [], blocked: false, dropIncoming: null, hold: null, held: [] };
  /** Delivers the held frames, in the order they came. */
  spy.release = () => {
    const held = spy.held;
    spy.held = [];
    for (const [handler, ev] of held) handler(ev);
  };
  class SpyWebSocket extends WsWebSocket {
    constructor(url) {
      if (spy.blocked) throw new Error("blocked by the test");
      super(url);
      spy.sockets.push(this);
      const wrap = (handler) => (ev) => {
        const frame = JSON.parse(ev.data);
        spy.frames.push(frame);
        if (spy.dropIncoming && spy.dropIncoming(frame)) return;
        if (spy.hold && spy.hold(frame)) return void spy.held.push([handler, ev]);
        handler(ev);
      };
      let onmessage = null;
      Object.defineProperty(this, "onmessage", {
        get: () => onmessage,
        set: (h) => {
          if (onmessage) this.removeEventListener("message", onmessage);
          onmessage = h ? wrap(h) : null;
          if (onmessage) this.addEventListener("message", onmessage);
        },
      });
    }
    send(data) {
      spy.sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  spy.WebSocket = SpyWebSocket;
  /** Breaks the current connection without a close frame (the client sees 1006). */
  spy.sever = () => spy.sockets.at(-1).terminate();
  return spy;
}

/** Resolves when `pred()` holds; fails at the deadline with `what`. */
export async function until(what, pred, ms = DEADLINE_MS) {
  const start = Date.now();
  for (;;) {
    if (await pred()) return;
    if (Date.now() - start > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** `promise`, or a failure naming `what` at the deadline. */
export function within(what, promise, ms = DEADLINE_MS) {
  let timer;
  const late = new Promise((_, fail) => { timer = setTimeout(() => fail(new Error(`timed out waiting for ${what}`)), ms); });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

/** The next `state` event of `client` matching `pred`. */
export function nextState(client, pred, ms = DEADLINE_MS) {
  return new Promise((ok, fail) => {
    if (pred(client.current)) return ok(client.current);
    const timer = setTimeout(() => { off(); fail(new Error(`no matching state; last ${JSON.stringify(client.current)}`)); }, ms);
    const off = client.on("state", (s) => {
      if (pred(s)) { clearTimeout(timer); off(); ok(s); }
    });
  });
}

export { WsWebSocket };
