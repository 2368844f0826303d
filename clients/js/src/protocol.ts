// The wire frames of protocol/PROTOCOL.md as TypeScript types, and a
// runtime validator for each. The validators are what the spec test checks
// against every JSON example of PROTOCOL.md, so the types and the spec
// cannot drift; the client also uses them to refuse malformed server
// frames. This module does no I/O.

/** A request id: an unsigned integer the client chooses. */
export type RequestId = number;

/** Any JSON value: what a message body may be. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

// ---- client frames ----

export interface AuthFrame { type: "auth"; token: string }
export interface RefreshFrame { type: "refresh"; id?: RequestId; token: string }
export interface JoinFrame { type: "join"; id?: RequestId; room: string; since?: number; epoch?: string }
export interface LeaveFrame { type: "leave"; id?: RequestId; room: string }
export interface SendFrame { type: "send"; id?: RequestId; room: string; body: Json; key?: string }
export interface HistoryFrame {
  type: "history"; id?: RequestId; room: string; before?: number; after?: number; limit?: number;
}
export interface TypingFrame { type: "typing"; id?: RequestId; room: string }
/** Pages a joined room's users, sorted by name, after the name `after`. */
export interface PresenceFrame { type: "presence"; id?: RequestId; room: string; after?: string; limit?: number }
export interface PingFrame { type: "ping"; id?: RequestId }

export type ClientFrame =
  | AuthFrame | RefreshFrame | JoinFrame | LeaveFrame | SendFrame | HistoryFrame
  | TypingFrame | PresenceFrame | PingFrame;

// ---- server frames ----

export interface WelcomeFrame {
  type: "welcome"; session: string; user: string; heartbeat_ms: number; server: string; protocol: number;
}
export interface JoinedFrame {
  type: "joined"; id?: RequestId; room: string; seq: number; epoch: string;
  /** Distinct users in the room, the joiner included. */
  count: number;
  /** The first users by name: all of them when `count` is no larger than the server's `presence_list_max`. */
  presence: string[];
  recovered?: boolean;
}
export interface LeftFrame { type: "left"; id?: RequestId; room: string }
export interface AckFrame { type: "ack"; id?: RequestId; room: string; seq: number; ts: number; duplicate?: boolean }
export interface MessageFrame {
  type: "message"; room: string; seq: number; from: string; ts: number; body: Json; replay?: boolean;
}
export interface HistoryMessage { seq: number; from: string; ts: number; body?: Json; erased?: boolean }
export interface HistoryReplyFrame {
  type: "history"; id?: RequestId; room: string; messages: HistoryMessage[]; more: boolean;
}
/** Users who typed in the last interval: `count` of them, the first few named. */
export interface TypingEventFrame { type: "typing"; room: string; count: number; users: string[] }
/** Users came or went; `count` is the room's number of users after them. */
export interface PresenceEventFrame {
  type: "presence"; room: string; count: number; joined?: string[]; left?: string[]; truncated?: boolean;
}
/** Reply to `presence`: one page of the room's users, sorted by name. */
export interface MembersFrame {
  type: "members"; id?: RequestId; room: string; count: number; users: string[]; more: boolean;
}
export interface TokenExpiringFrame { type: "token_expiring"; expires_at: number }
export interface RefreshedFrame { type: "refreshed"; id?: RequestId; expires_at: number }
export interface PongFrame { type: "pong"; id?: RequestId }
export type ErrorCode =
  | "bad_request" | "unknown_type" | "not_joined" | "invalid_room" | "unauthorized"
  | "forbidden" | "too_large" | "rate_limited" | "binary_unsupported" | "unavailable" | "internal";
export interface ErrorFrame {
  type: "error"; id?: RequestId; code: ErrorCode | string; message: string; retry_after_ms?: number;
}

export type ServerFrame =
  | WelcomeFrame | JoinedFrame | LeftFrame | AckFrame | MessageFrame | HistoryReplyFrame
  | TypingEventFrame | PresenceEventFrame | MembersFrame | TokenExpiringFrame | RefreshedFrame | PongFrame
  | ErrorFrame;

// ---- validators ----

type Check = (v: unknown) => boolean;
type Shape = Record<string, [required: boolean, check: Check]>;

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
const str: Check = (v) => typeof v === "string";
const uint: Check = (v) => typeof v === "number" && Number.isInteger(v) && v >= 0;
const num: Check = (v) => typeof v === "number" && Number.isFinite(v);
const bool: Check = (v) => typeof v === "boolean";
const strs: Check = (v) => Array.isArray(v) && v.every((x) => typeof x === "string");
/** JSON every reader can parse back: no non-finite number. */
const json: Check = (v) => {
  if (typeof v === "number") return Number.isFinite(v);
  if (Array.isArray(v)) return v.every(json);
  if (isObject(v)) return Object.values(v).every(json);
  return v === null || typeof v === "string" || typeof v === "boolean";
};

const historyMessage: Check = (v) =>
  check(v, { seq: [true, uint], from: [true, str], ts: [true, uint], body: [false, json], erased: [false, bool] })
    .length === 0;

const ID: [boolean, Check] = [false, uint];

const clientShapes: Record<string, Shape> = {
  auth: { token: [true, str] },
  refresh: { id: ID, token: [true, str] },
  join: { id: ID, room: [true, str], since: [false, uint], epoch: [false, str] },
  leave: { id: ID, room: [true, str] },
  send: { id: ID, room: [true, str], body: [true, json], key: [false, str] },
  history: { id: ID, room: [true, str], before: [false, uint], after: [false, uint], limit: [false, uint] },
  typing: { id: ID, room: [true, str] },
  presence: { id: ID, room: [true, str], after: [false, str], limit: [false, uint] },
  ping: { id: ID },
};

const serverShapes: Record<string, Shape> = {
  welcome: {
    session: [true, str], user: [true, str], heartbeat_ms: [true, uint], server: [true, str], protocol: [true, uint],
  },
  joined: {
    id: ID, room: [true, str], seq: [true, uint], epoch: [true, str], count: [true, uint], presence: [true, strs],
    recovered: [false, bool],
  },
  left: { id: ID, room: [true, str] },
  ack: { id: ID, room: [true, str], seq: [true, uint], ts: [true, uint], duplicate: [false, bool] },
  message: {
    room: [true, str], seq: [true, uint], from: [true, str], ts: [true, uint], body: [true, json], replay: [false, bool],
  },
  history: {
    id: ID, room: [true, str], messages: [true, (v) => Array.isArray(v) && v.every(historyMessage)], more: [true, bool],
  },
  typing: { room: [true, str], count: [true, uint], users: [true, strs] },
  presence: {
    room: [true, str], count: [true, uint], joined: [false, strs], left: [false, strs], truncated: [false, bool],
  },
  members: { id: ID, room: [true, str], count: [true, uint], users: [true, strs], more: [true, bool] },
  token_expiring: { expires_at: [true, uint] },
  refreshed: { id: ID, expires_at: [true, uint] },
  pong: { id: ID },
  error: { id: ID, code: [true, str], message: [true, str], retry_after_ms: [false, num] },
};

function check(v: unknown, shape: Shape): string[] {
  if (!isObject(v)) return ["not a JSON object"];
  const problems: string[] = [];
  for (const [field, [required, ok]] of Object.entries(shape)) {
    const present = field in v && (v[field] !== undefined);
    if (!present) {
      if (required) problems.push(`missing \`${field}\``);
    } else if (!ok(v[field])) {
      problems.push(`\`${field}\` has the wrong type`);
    }
  }
  return problems;
}

function validate(v: unknown, shapes: Record<string, Shape>): string[] {
  if (!isObject(v)) return ["not a JSON object"];
  const type = v.type;
  if (typeof type !== "string") return ["missing `type`"];
  const shape = shapes[type];
  if (!shape) return [`unknown type \`${type}\``];
  const problems = check(v, shape);
  if (type === "error" && v.code === "rate_limited" && v.retry_after_ms === undefined) {
    problems.push("`rate_limited` carries `retry_after_ms`");
  }
  return problems;
}

/** What is wrong with `v` as a client frame; empty when it is one. */
export function validateClientFrame(v: unknown): string[] {
  return validate(v, clientShapes);
}

/** What is wrong with `v` as a server frame; empty when it is one. Unknown fields are allowed. */
export function validateServerFrame(v: unknown): string[] {
  return validate(v, serverShapes);
}

export function isServerFrame(v: unknown): v is ServerFrame {
  return validateServerFrame(v).length === 0;
}
