// The public entry point of the Switchboard TypeScript SDK.
export { Client, Room } from "./client.js";
export type {
  Ack, ClientEvents, ClientOptions, ClientState, DisconnectReason, Gap, HistoryPage, HistoryQuery, MemberPage, Message,
  RoomEvents, RoomStatus, WebSocketConstructor, WebSocketLike,
} from "./client.js";
export { ClosedError, DisconnectedError, ServerError, TimeoutError } from "./errors.js";
export {
  DEFAULT_BACKOFF, PROTOCOL_VERSION, afterClose, afterHttpRefusal, delayFor, parseRetryAfter, retryAfterFromReason, retryDelay,
  retryForError,
} from "./backoff.js";
export type { BackoffOptions, Next } from "./backoff.js";
export { isServerFrame, validateClientFrame, validateServerFrame } from "./protocol.js";
export type * from "./protocol.js";
