// The errors the client's promises reject with. Each is a class of its own
// so an application can tell them apart with `instanceof`.

/** The server answered a request with an `error` frame. */
export class ServerError extends Error {
  override readonly name = "ServerError";
  constructor(
    /** The error code of PROTOCOL.md section 5, e.g. `not_joined`. */
    readonly code: string,
    message: string,
    /** Present on `rate_limited` and `unavailable`. */
    readonly retryAfterMs?: number,
  ) {
    super(`${code}: ${message}`);
  }
}

/** No reply came within the request timeout. */
export class TimeoutError extends Error {
  override readonly name = "TimeoutError";
  constructor(readonly what: string, readonly afterMs: number) {
    super(`${what}: no reply within ${afterMs} ms`);
  }
}

/** The connection ended before the reply came (the request was not resent). */
export class DisconnectedError extends Error {
  override readonly name = "DisconnectedError";
  constructor(what: string) {
    super(`${what}: the connection ended before the reply`);
  }
}

/** The application closed the client; nothing more will be sent. */
export class ClosedError extends Error {
  override readonly name = "ClosedError";
  constructor(what: string) {
    super(`${what}: the client is closed`);
  }
}
