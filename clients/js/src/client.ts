// The Switchboard client: one connection, its reconnects, and the rooms
// joined through it. It owns the promises of PROTOCOL.md section 11 for
// the application: every message of a joined room is delivered once, in
// seq order, across reconnects (resume with `since`/`epoch`, history when
// the server cannot replay); every send is stored once (idempotency keys,
// resent until acked). It must never deliver a seq twice or out of order,
// and never drop an unacked send except when the application closes it.

import {
  type BackoffOptions, DEFAULT_BACKOFF, PROTOCOL_VERSION, afterClose, afterHttpRefusal, delayFor, type Next, parseRetryAfter,
  retryDelay,
} from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ClosedError, DisconnectedError, ServerError, TimeoutError } from "./errors.js";
import {
  type ClientFrame, type HistoryMessage, type HistoryReplyFrame, type JoinedFrame, type Json,
  type MembersFrame, type MessageFrame, type PresenceEventFrame, type ServerFrame, validateServerFrame,
} from "./protocol.js";

/** The part of the WebSocket API the client uses (browsers' and `ws`'s both fit). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** `wss://HOST:PORT/ws` (or `ws://` behind a TLS proxy). */
  url: string;
  /** Dev mode's user (`?user=NAME`). */
  user?: string;
  /** Called at every connect and on `token_expiring`; the token goes in a
   * first `auth` frame (never in the URL) and in `refresh`. */
  token?: () => string | Promise<string>;
  /** The WebSocket implementation; default `globalThis.WebSocket`. In Node
   * before 22 pass `WebSocket` from the `ws` package. */
  WebSocket?: WebSocketConstructor;
  /** Reconnect delays (see `BackoffOptions`). */
  backoff?: Partial<BackoffOptions>;
  /** How long a request (join, leave, history, refresh, ping) waits for its
   * reply. Default 10 000 ms. */
  requestTimeoutMs?: number;
  /** How long a send waits for its ack, across reconnects, before it
   * rejects with `TimeoutError` and is no longer resent. Default 0: until
   * acked or the client is closed. */
  sendTimeoutMs?: number;
  /** Most missed messages paged through `history` after a resume the
   * server could not replay; an older part of the gap is reported as a
   * `gap` event instead. Default 10 000. */
  maxGapFill?: number;
  /** `history` page size used to fill a gap. Default 200 (the server's maximum). */
  gapPageSize?: number;
  /** Least time between two `typing` notices for one room. Default 2 000 ms. */
  typingThrottleMs?: number;
  /** Randomness of the jitter, [0, 1). Default `Math.random`. */
  random?: () => number;
  /** Connect at once (default true); else call `connect()`. */
  autoConnect?: boolean;
}

/** Why the connection ended. */
export interface DisconnectReason {
  /** The WebSocket close code (1006 when the connection just broke). */
  code: number;
  /** The close reason the server gave. */
  reason: string;
  /** The HTTP status of a refused upgrade. Only Node with `ws` reports it:
   * a browser (and Node 22's global WebSocket) sees a refused upgrade as
   * close 1006, like a network failure. */
  httpStatus?: number;
  /** The refusal's `Retry-After`, in ms (with `httpStatus` only): the
   * backoff waits at least this long. */
  retryAfterMs?: number;
  /** The server's `welcome.protocol` when it is not `PROTOCOL_VERSION`: the
   * client closed the session and stopped; it must be upgraded. */
  protocol?: number;
  /** The application called `close()`. */
  byClient: boolean;
}

export type ClientState =
  | { state: "connecting"; attempt: number }
  | { state: "connected"; user: string; session: string; resumed: boolean }
  | { state: "disconnected"; reason: DisconnectReason; willReconnect: boolean; delayMs?: number };

/** A message as the application sees it: once, in seq order per room. */
export interface Message {
  room: string;
  seq: number;
  from: string;
  ts: number;
  body: Json;
  /** The message was erased: it keeps its seq and sender, not its body. */
  erased?: boolean;
}

export interface Ack { room: string; seq: number; ts: number; duplicate: boolean }

/** Messages the client did not deliver and will not: the application may page them with `room.history`. */
export interface Gap {
  room: string;
  /** First missing seq. */
  fromSeq: number;
  /** Last missing seq. */
  toSeq: number;
  /** `too_long`: longer than `maxGapFill`; `epoch`: the server's history was recreated. */
  reason: "too_long" | "epoch";
}

export interface ClientEvents extends Record<string, unknown> {
  state: ClientState;
  message: Message;
  gap: Gap;
  /** An `error` frame that no request of the client's caused. */
  error: ServerError;
  /** `refresh` succeeded; the value is the new expiry (Unix seconds). */
  refreshed: number;
}

export type RoomStatus = "idle" | "joining" | "joined" | "recovering" | "left" | "failed";

export interface RoomEvents extends Record<string, unknown> {
  message: Message;
  status: RoomStatus;
  /** The member set changed. */
  presence: ReadonlySet<string>;
  /** A user (not this one) is typing. */
  typing: string;
  gap: Gap;
}

export interface HistoryQuery { before?: number; after?: number; limit?: number }
export interface HistoryPage { messages: Message[]; more: boolean }
/** One page of a room's users: `count` in all, `users` of them here. */
export interface MemberPage { count: number; users: string[]; more: boolean }

interface PendingRequest {
  what: string;
  resolve: (f: ServerFrame) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout> | undefined;
}

interface PendingSend {
  room: string;
  body: Json;
  key: string;
  /** The id of its frame on the current connection, if sent on it. */
  id: number | undefined;
  /** Consecutive refusals (`unavailable`, `internal`, ...), which lengthen
   * the wait before the next try. */
  refusals: number;
  resolve: (a: Ack) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout> | undefined;
}

const OPEN = 1;

function randomKey(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

function toMessage(room: string, m: HistoryMessage): Message {
  const msg: Message = { room, seq: m.seq, from: m.from, ts: m.ts, body: m.erased ? null : (m.body ?? null) };
  if (m.erased) msg.erased = true;
  return msg;
}

/** A room: its membership, its delivery cursor and its events. */
export class Room extends Emitter<RoomEvents> {
  /** The room's state: `recovering` while a gap is paged from history. */
  status: RoomStatus = "idle";
  /** The last seq delivered to the application. */
  lastSeq: number | undefined;
  /** The history lifetime `lastSeq` belongs to. */
  epoch: string | undefined;
  /** Members the server named (all of them, or a bounded first page on servers that bound `joined`). */
  readonly members = new Set<string>();
  /** The member count when the server sends one, else the size of `members`. */
  memberCount = 0;
  /** @internal */ wanted = false;
  /** @internal */ joinWaiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  /** @internal */ buffer: MessageFrame[] = [];
  /** @internal */ lastTypingSent = -Infinity;
  /** @internal Consecutive refusals of the client's own join, cleared by `joined`. */
  refusals = 0;

  constructor(private readonly client: Client, readonly name: string, resume?: { since: number; epoch: string }) {
    super();
    if (resume) {
      this.lastSeq = resume.since;
      this.epoch = resume.epoch;
    }
  }

  /** Joins (and after every reconnect, resumes); resolves once joined. */
  join(): Promise<void> {
    return this.client.joinRoom(this);
  }

  /** Leaves; the room is no longer resumed. */
  leave(): Promise<void> {
    return this.client.leaveRoom(this);
  }

  /** Sends `body`; resolves with the ack once it is durable. Resent with
   * the same key after a reconnect until acked, so it is stored once. */
  send(body: Json, opts: { key?: string } = {}): Promise<Ack> {
    return this.client.sendTo(this, body, opts.key ?? randomKey());
  }

  /** One page of stored messages (joining is not needed). */
  history(q: HistoryQuery = {}): Promise<HistoryPage> {
    return this.client.historyOf(this.name, q);
  }

  /** One page of the room's users, sorted by name, after the name `after`
   * (the room must be joined). `members` holds only the first names the
   * server sends in `joined` (its `presence_list_max`); page the rest here. */
  memberPage(q: { after?: string; limit?: number } = {}): Promise<MemberPage> {
    return this.client.membersOf(this.name, q);
  }

  /** Tells the others this user is typing; throttled (`typingThrottleMs`). */
  typing(): void {
    this.client.typingIn(this);
  }

  /** @internal */ setStatus(s: RoomStatus): void {
    if (this.status === s) return;
    this.status = s;
    this.emit("status", s);
  }
}

/** A Switchboard client. See README.md for a complete example. */
export class Client extends Emitter<ClientEvents> {
  private readonly o: Required<Omit<ClientOptions, "user" | "token" | "WebSocket" | "backoff">> & {
    backoff: BackoffOptions;
  };
  private readonly WS: WebSocketConstructor;
  private ws: WebSocketLike | null = null;
  /** Increments with every connection, so callbacks of an old one are ignored. */
  private generation = 0;
  private nextId = 1;
  private attempt = 0;
  private everConnected = false;
  private closedByApp = false;
  private stopped = false;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private pingTimer: ReturnType<typeof setInterval> | undefined;
  private httpStatus: number | undefined;
  private httpRetryAfterMs: number | undefined;
  private readonly requests = new Map<number, PendingRequest>();
  /** Unacked sends, in the order the application made them. */
  private readonly sends = new Map<string, PendingSend>();
  private readonly rooms = new Map<string, Room>();
  /** The state; `state` events report each change. */
  current: ClientState = { state: "disconnected", reason: { code: 1000, reason: "", byClient: true }, willReconnect: false };

  constructor(private readonly options: ClientOptions) {
    super();
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError("no WebSocket implementation: pass options.WebSocket (in Node 20, from the `ws` package)");
    this.WS = WS;
    this.o = {
      url: options.url,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      sendTimeoutMs: options.sendTimeoutMs ?? 0,
      maxGapFill: options.maxGapFill ?? 10_000,
      gapPageSize: options.gapPageSize ?? 200,
      typingThrottleMs: options.typingThrottleMs ?? 2000,
      random: options.random ?? Math.random,
      autoConnect: options.autoConnect ?? true,
      backoff: { ...DEFAULT_BACKOFF, ...options.backoff },
    };
    if (this.o.autoConnect) this.connect();
  }

  /** The room object of `name` (one per name); `resume` starts it from a saved cursor. */
  room(name: string, resume?: { since: number; epoch: string }): Room {
    let r = this.rooms.get(name);
    if (!r) {
      r = new Room(this, name, resume);
      this.rooms.set(name, r);
    }
    return r;
  }

  /** Unacked sends, for display (e.g. "sending…"). */
  get pendingSends(): number {
    return this.sends.size;
  }

  /** Connects (again, after a stop). */
  connect(): void {
    this.closedByApp = false;
    this.stopped = false;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    if (this.ws) return;
    void this.open();
  }

  /** Closes for good: pending requests and sends reject with `ClosedError`. */
  close(): void {
    this.closedByApp = true;
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    for (const s of this.sends.values()) {
      clearTimeout(s.timer);
      s.reject(new ClosedError("send"));
    }
    this.sends.clear();
    for (const r of this.rooms.values()) {
      for (const w of r.joinWaiters) w.reject(new ClosedError("join"));
      r.joinWaiters = [];
    }
    const ws = this.ws;
    if (ws) {
      ws.close(1000, "client closed");
      this.ended(this.generation, { code: 1000, reason: "client closed", byClient: true });
    } else this.setState({ state: "disconnected", reason: { code: 1000, reason: "client closed", byClient: true }, willReconnect: false });
  }

  private setState(s: ClientState): void {
    this.current = s;
    this.emit("state", s);
  }

  private async open(): Promise<void> {
    const gen = ++this.generation;
    this.setState({ state: "connecting", attempt: this.attempt });
    let token: string | undefined;
    if (this.options.token) {
      try {
        token = await this.options.token();
      } catch (e) {
        if (gen !== this.generation || this.stopped) return;
        // A token provider that fails is retried like a failed connection.
        this.schedule({ code: 1006, reason: `token provider failed: ${String(e)}`, byClient: false }, { action: "backoff", minDelayMs: 0 });
        return;
      }
      if (gen !== this.generation || this.stopped) return;
    }
    const url = new URL(this.o.url);
    if (this.options.user !== undefined) url.searchParams.set("user", this.options.user);
    this.httpStatus = undefined;
    this.httpRetryAfterMs = undefined;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url.toString());
    } catch (e) {
      this.schedule({ code: 1006, reason: String(e), byClient: false }, { action: "backoff", minDelayMs: 0 });
      return;
    }
    this.ws = ws;
    this.watchRefusal(ws, gen);
    ws.onopen = () => {
      if (gen !== this.generation) return;
      // Everything goes out at once, before `welcome` (PROTOCOL.md section 2):
      // auth first, then the joins, then the unacked sends, in order.
      if (token !== undefined) this.write({ type: "auth", token });
      for (const r of this.rooms.values()) if (r.wanted) this.writeJoin(r);
      for (const s of this.sends.values()) this.writeSend(s);
    };
    ws.onmessage = (ev) => {
      if (gen !== this.generation) return;
      if (typeof ev.data !== "string") return;
      let frame: unknown;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      const problems = validateServerFrame(frame);
      if (problems.length > 0) {
        console.warn(`switchboard: ignored a malformed frame (${problems.join("; ")})`);
        return;
      }
      this.onFrame(frame as ServerFrame, gen);
    };
    ws.onerror = (ev) => {
      if (gen !== this.generation) return;
      // `ws` reports a refused upgrade as "Unexpected server response: 401".
      const e = ev as { message?: unknown; error?: { message?: unknown } };
      const text = String(e?.message ?? e?.error?.message ?? "");
      const m = /Unexpected server response: (\d{3})/.exec(text);
      if (m) this.httpStatus = Number(m[1]);
    };
    ws.onclose = (ev) => {
      if (gen !== this.generation) return;
      const reason: DisconnectReason = { code: ev.code, reason: ev.reason ?? "", byClient: this.closedByApp };
      if (this.httpStatus !== undefined) reason.httpStatus = this.httpStatus;
      if (this.httpRetryAfterMs !== undefined) reason.retryAfterMs = this.httpRetryAfterMs;
      this.ended(gen, reason);
    };
  }

  /** Reads the status and `Retry-After` of a refused upgrade where the
   * WebSocket lets it be seen: `ws` in Node emits `unexpected-response`
   * with the HTTP response. Browsers' and undici's WebSocket show nothing. */
  private watchRefusal(ws: WebSocketLike, gen: number): void {
    type Response = { statusCode?: number; headers?: Record<string, string | string[] | undefined> };
    const node = ws as unknown as {
      on?: (event: string, listener: (req: unknown, res: Response) => void) => unknown;
      terminate?: () => void;
    };
    if (typeof node.on !== "function" || typeof node.terminate !== "function") return;
    node.on("unexpected-response", (_req, res) => {
      if (gen === this.generation) {
        this.httpStatus = res.statusCode;
        const h = res.headers?.["retry-after"];
        this.httpRetryAfterMs = parseRetryAfter(Array.isArray(h) ? h[0] : h);
      }
      // With a listener `ws` leaves the refused handshake to it: end it,
      // which reports close 1006.
      node.terminate?.();
    });
  }

  /** The connection of generation `gen` ended: clean up and decide what next. */
  private ended(gen: number, reason: DisconnectReason): void {
    if (gen !== this.generation) return;
    this.generation++;
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    }
    clearInterval(this.pingTimer);
    this.pingTimer = undefined;
    for (const [, req] of this.requests) {
      clearTimeout(req.timer);
      req.reject(new DisconnectedError(req.what));
    }
    this.requests.clear();
    for (const s of this.sends.values()) s.id = undefined;
    for (const r of this.rooms.values()) {
      r.buffer = [];
      if (r.wanted) r.setStatus("joining");
    }
    const next: Next = reason.byClient
      ? { action: "stop" }
      : reason.httpStatus !== undefined
        ? afterHttpRefusal(reason.httpStatus, reason.retryAfterMs)
        : reason.protocol !== undefined
          ? { action: "stop" }
          : afterClose(reason.code, reason.reason, false);
    this.schedule(reason, next);
  }

  /** Gives up on a connection that stopped answering: closes it without
   * waiting for the close handshake (a dead path never completes it) and
   * reconnects with backoff. */
  private drop(gen: number, why: string): void {
    if (gen !== this.generation || !this.ws) return;
    // 3000-3999: an application code, which browsers allow a client to send.
    this.ws.close(3001, why);
    this.ended(gen, { code: 1006, reason: why, byClient: false });
  }

  private schedule(reason: DisconnectReason, next: Next): void {
    this.ws = null;
    const delay = this.closedByApp ? undefined : delayFor(next, this.attempt, this.o.backoff, this.o.random);
    if (delay === undefined) {
      this.stopped = true;
      // Waiting joins learn of the stop; the rooms stay wanted, so a later
      // `connect()` joins them again (and resends the unacked sends).
      for (const r of this.rooms.values()) {
        for (const w of r.joinWaiters) w.reject(new DisconnectedError(`join ${r.name}`));
        r.joinWaiters = [];
      }
      this.setState({ state: "disconnected", reason, willReconnect: false });
      return;
    }
    if (next.action === "backoff") this.attempt++;
    this.setState({ state: "disconnected", reason, willReconnect: true, delayMs: delay });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      if (!this.stopped && !this.ws) void this.open();
    }, delay);
  }

  private write(frame: ClientFrame): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  /** Sends a request and waits for its reply (or its `error`). */
  private request(frame: ClientFrame & { id?: number }, what: string): Promise<ServerFrame> {
    return new Promise((resolve, reject) => {
      if (this.closedByApp) return reject(new ClosedError(what));
      const id = this.nextId++;
      frame.id = id;
      if (!this.write(frame)) return reject(new DisconnectedError(what));
      const timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new TimeoutError(what, this.o.requestTimeoutMs));
      }, this.o.requestTimeoutMs);
      this.requests.set(id, { what, resolve, reject, timer });
    });
  }

  private writeJoin(r: Room): void {
    const id = this.nextId++;
    const frame: ClientFrame = { type: "join", id, room: r.name };
    if (r.lastSeq !== undefined && r.epoch !== undefined) {
      frame.since = r.lastSeq;
      frame.epoch = r.epoch;
    }
    r.setStatus("joining");
    if (!this.write(frame)) return;
    // A join's reply is handled by room (`joined` names it); the id only
    // routes an `error` back to the room.
    this.requests.set(id, {
      what: `join ${r.name}`,
      resolve: () => {},
      reject: (e) => this.joinFailed(r, e),
      timer: undefined,
    });
  }

  private joinFailed(r: Room, e: Error): void {
    if (e instanceof DisconnectedError) return; // rejoined on reconnect
    // `rate_limited`, `unavailable` (in cluster mode, a room whose stream
    // cannot be read yet): the join goes out again after the advised delay.
    const delay = e instanceof ServerError ? retryDelay(e.code, e.retryAfterMs, ++r.refusals, this.o.backoff, this.o.random) : undefined;
    if (delay !== undefined) {
      const gen = this.generation;
      setTimeout(() => {
        if (gen === this.generation && r.wanted && r.status === "joining") this.writeJoin(r);
      }, delay);
      return;
    }
    r.wanted = false;
    r.setStatus("failed");
    for (const w of r.joinWaiters) w.reject(e);
    r.joinWaiters = [];
  }

  private writeSend(s: PendingSend): void {
    const id = this.nextId++;
    if (this.write({ type: "send", id, room: s.room, body: s.body, key: s.key })) s.id = id;
  }

  /** @internal */
  joinRoom(r: Room): Promise<void> {
    if (this.closedByApp) return Promise.reject(new ClosedError("join"));
    if (r.wanted && (r.status === "joined" || r.status === "recovering")) return Promise.resolve();
    return new Promise((resolve, reject) => {
      r.joinWaiters.push({ resolve, reject });
      if (!r.wanted) {
        r.wanted = true;
        this.writeJoin(r);
      }
    });
  }

  /** @internal */
  async leaveRoom(r: Room): Promise<void> {
    r.wanted = false;
    r.buffer = [];
    try {
      await this.request({ type: "leave", room: r.name }, `leave ${r.name}`);
    } finally {
      r.members.clear();
      r.setStatus("left");
    }
  }

  /** @internal */
  sendTo(r: Room, body: Json, key: string): Promise<Ack> {
    if (this.closedByApp) return Promise.reject(new ClosedError("send"));
    return new Promise((resolve, reject) => {
      const s: PendingSend = { room: r.name, body, key, id: undefined, refusals: 0, resolve, reject, timer: undefined };
      if (this.o.sendTimeoutMs > 0) {
        s.timer = setTimeout(() => {
          this.sends.delete(key);
          reject(new TimeoutError(`send ${key}`, this.o.sendTimeoutMs));
        }, this.o.sendTimeoutMs);
      }
      this.sends.set(key, s);
      this.writeSend(s);
    });
  }

  /** @internal */
  /** @internal */
  async membersOf(room: string, q: { after?: string; limit?: number }): Promise<MemberPage> {
    const reply = (await this.request({ type: "presence", room, ...q }, `presence ${room}`)) as MembersFrame;
    return { count: reply.count, users: reply.users, more: reply.more };
  }

  async historyOf(room: string, q: HistoryQuery): Promise<HistoryPage> {
    const reply = (await this.request({ type: "history", room, ...q }, `history ${room}`)) as HistoryReplyFrame;
    return { messages: reply.messages.map((m) => toMessage(room, m)), more: reply.more };
  }

  /** @internal */
  typingIn(r: Room): void {
    const now = Date.now();
    if (now - r.lastTypingSent < this.o.typingThrottleMs) return;
    if (this.write({ type: "typing", room: r.name })) r.lastTypingSent = now;
  }

  /** A `ping` round trip; resolves with its duration in ms. */
  async ping(): Promise<number> {
    const t = Date.now();
    await this.request({ type: "ping" }, "ping");
    return Date.now() - t;
  }

  private onFrame(f: ServerFrame, gen: number): void {
    switch (f.type) {
      case "welcome": {
        if (f.protocol !== PROTOCOL_VERSION) {
          // Another major version (PROTOCOL.md section 11): nothing else
          // of this session can be trusted to mean what this client reads.
          const reason = `the server speaks protocol ${f.protocol}; this client speaks ${PROTOCOL_VERSION}`;
          this.ws?.close(1000, "unsupported protocol version");
          this.ended(gen, { code: 1000, reason, byClient: false, protocol: f.protocol });
          return;
        }
        const resumed = this.everConnected;
        this.everConnected = true;
        this.attempt = 0;
        this.setState({ state: "connected", user: f.user, session: f.session, resumed });
        // Browsers cannot answer WebSocket pings from script, and a broken
        // path may never report a close: a `ping` request each heartbeat
        // notices it (its timeout closes the connection, which reconnects).
        clearInterval(this.pingTimer);
        if (f.heartbeat_ms > 0) {
          this.pingTimer = setInterval(() => {
            this.ping().catch((e) => {
              if (e instanceof TimeoutError) this.drop(gen, "ping timeout");
            });
          }, f.heartbeat_ms);
        }
        return;
      }
      case "joined":
        return this.onJoined(f, gen);
      case "message": {
        const r = this.rooms.get(f.room);
        if (r && r.wanted) this.onMessage(r, f, gen);
        return;
      }
      case "ack": {
        const s = [...this.sends.values()].find((x) => x.id !== undefined && x.id === f.id);
        if (s) {
          this.sends.delete(s.key);
          clearTimeout(s.timer);
          s.resolve({ room: f.room, seq: f.seq, ts: f.ts, duplicate: f.duplicate ?? false });
        }
        return;
      }
      case "presence":
        return this.onPresence(f);
      case "typing": {
        const r = this.rooms.get(f.room);
        if (!r) return;
        // With several typers the event reaches the typers too: leave this user out.
        const me = this.current.state === "connected" ? this.current.user : undefined;
        for (const u of f.users) if (u !== me) r.emit("typing", u);
        return;
      }
      case "token_expiring":
        void this.refresh();
        return;
      case "left": {
        if (f.id === undefined) {
          // The server left the room for us (a refreshed token no longer allows it).
          const r = this.rooms.get(f.room);
          if (r) {
            r.wanted = false;
            r.setStatus("left");
          }
          return;
        }
        break;
      }
      case "error": {
        const err = new ServerError(f.code, f.message, f.retry_after_ms);
        if (f.id !== undefined) {
          const s = [...this.sends.values()].find((x) => x.id === f.id);
          if (s) return this.sendFailed(s, err);
          const req = this.requests.get(f.id);
          if (req) {
            this.requests.delete(f.id);
            clearTimeout(req.timer);
            req.reject(err);
            return;
          }
        }
        this.emit("error", err);
        return;
      }
      default:
        break;
    }
    if ("id" in f && f.id !== undefined) {
      const req = this.requests.get(f.id);
      if (req) {
        this.requests.delete(f.id);
        clearTimeout(req.timer);
        req.resolve(f);
      }
    }
  }

  /** A send was refused: retried with its key when PROTOCOL.md section 5
   * says it may be (`rate_limited`, `unavailable`, `internal`), without the
   * application seeing the error; else rejected. */
  private sendFailed(s: PendingSend, err: ServerError): void {
    s.id = undefined;
    s.refusals++;
    const delay = retryDelay(err.code, err.retryAfterMs, s.refusals, this.o.backoff, this.o.random);
    if (delay !== undefined) {
      setTimeout(() => {
        if (this.sends.get(s.key) === s && s.id === undefined) this.writeSend(s);
      }, delay);
      return;
    }
    this.sends.delete(s.key);
    clearTimeout(s.timer);
    s.reject(err);
  }

  private async refresh(): Promise<void> {
    const provider = this.options.token;
    if (!provider) return;
    try {
      const token = await provider();
      const reply = await this.request({ type: "refresh", token }, "refresh");
      if (reply.type === "refreshed") this.emit("refreshed", reply.expires_at);
    } catch (e) {
      this.emit("error", e instanceof ServerError ? e : new ServerError("refresh_failed", String(e)));
    }
  }

  private onPresence(f: PresenceEventFrame): void {
    const r = this.rooms.get(f.room);
    if (!r) return;
    for (const u of f.joined ?? []) r.members.add(u);
    for (const u of f.left ?? []) r.members.delete(u);
    r.memberCount = f.count;
    r.emit("presence", r.members);
  }

  private onJoined(f: JoinedFrame, gen: number): void {
    if (f.id !== undefined) {
      const req = this.requests.get(f.id);
      if (req) {
        clearTimeout(req.timer);
        this.requests.delete(f.id);
      }
    }
    const r = this.rooms.get(f.room);
    if (!r || !r.wanted) return;
    r.refusals = 0;
    r.members.clear();
    for (const u of f.presence) r.members.add(u);
    r.memberCount = f.count;
    r.emit("presence", r.members);
    const epochChanged = r.epoch !== undefined && r.epoch !== f.epoch;
    const fresh = r.lastSeq === undefined;
    if (epochChanged) {
      // The server's history was recreated: the old seqs name nothing now.
      const gap: Gap = { room: r.name, fromSeq: 1, toSeq: r.lastSeq ?? 0, reason: "epoch" };
      r.emit("gap", gap);
      this.emit("gap", gap);
      r.lastSeq = 0;
    }
    r.epoch = f.epoch;
    if (fresh) {
      r.lastSeq = f.seq;
    } else if (epochChanged || f.recovered !== true) {
      void this.fillGap(r, f.seq, gen);
      this.resolveJoin(r, "recovering");
      return;
    }
    this.resolveJoin(r, "joined");
  }

  private resolveJoin(r: Room, status: RoomStatus): void {
    r.setStatus(status);
    for (const w of r.joinWaiters) w.resolve();
    r.joinWaiters = [];
  }

  private deliver(r: Room, m: Message): void {
    r.lastSeq = m.seq;
    r.emit("message", m);
    this.emit("message", m);
  }

  private onMessage(r: Room, f: MessageFrame, gen: number): void {
    if (r.status === "recovering") {
      r.buffer.push(f);
      return;
    }
    const last = r.lastSeq ?? f.seq - 1;
    if (f.seq <= last) return; // seen already
    if (f.seq === last + 1) {
      this.deliver(r, { room: r.name, seq: f.seq, from: f.from, ts: f.ts, body: f.body });
      return;
    }
    // A hole before this message (a conforming server never makes one):
    // page it from history, then go on.
    r.buffer.push(f);
    r.setStatus("recovering");
    void this.fillGap(r, f.seq - 1, gen);
  }

  /** Pages history after `lastSeq` up to `target` at least, then releases
   * the live messages that arrived meanwhile. */
  private async fillGap(r: Room, target: number, gen: number): Promise<void> {
    r.setStatus("recovering");
    let last = r.lastSeq ?? 0;
    if (target - last > this.o.maxGapFill) {
      const gap: Gap = { room: r.name, fromSeq: last + 1, toSeq: target - this.o.maxGapFill, reason: "too_long" };
      r.emit("gap", gap);
      this.emit("gap", gap);
      last = target - this.o.maxGapFill;
      r.lastSeq = last;
    }
    try {
      for (;;) {
        const page = await this.historyOf(r.name, { after: last, limit: this.o.gapPageSize });
        if (gen !== this.generation || !r.wanted) return;
        for (const m of page.messages) {
          if (m.seq > (r.lastSeq ?? 0)) this.deliver(r, m);
        }
        last = r.lastSeq ?? last;
        if (!page.more || page.messages.length === 0 || last >= target) break;
      }
    } catch {
      // The connection ended (it resumes from `lastSeq` on reconnect) or the
      // request timed out (the ping timer will notice a dead connection).
      this.drop(gen, "gap fill failed");
      return;
    }
    const buffered = r.buffer;
    r.buffer = [];
    r.setStatus("joined");
    for (const m of buffered) {
      if (r.status === "recovering") r.buffer.push(m);
      else this.onMessage(r, m, gen);
    }
  }
}
