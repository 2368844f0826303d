// The reconnect and retry policy of PROTOCOL.md sections 5, 9 and 11: what
// follows a close code, an HTTP refusal of the upgrade or a refused request
// ("stop", "immediate" or "backoff"), and the delays. Its table is
// protocol/reconnect-policy.json, which test/policy.test.mjs checks every
// function here against (as the Rust client is). Pure functions: no
// timers, no I/O, so every rule is unit-testable.

/** The protocol version this client speaks: `welcome.protocol` must equal it. */
export const PROTOCOL_VERSION = 1;

/** What the client does after a close. */
export type Next =
  | { action: "stop" }
  | { action: "immediate" }
  | { action: "backoff"; minDelayMs: number };

/** The server-advised delay in a close reason, `retry_after_ms=N`. */
export function retryAfterFromReason(reason: string): number | undefined {
  const m = /retry_after_ms=(\d+)/.exec(reason);
  return m ? Number(m[1]) : undefined;
}

/**
 * The rule for a WebSocket close code: the codes PROTOCOL.md section 9
 * lists, then its ranges for every other. `byClient` is true when the
 * application closed the client itself.
 */
export function afterClose(code: number, reason: string, byClient: boolean): Next {
  if (byClient) return { action: "stop" };
  if (code >= 4000 && code <= 4099) return { action: "stop" };
  if (code >= 4100 && code <= 4199) {
    return { action: "backoff", minDelayMs: retryAfterFromReason(reason) ?? 0 };
  }
  if (code >= 4200 && code <= 4299) return { action: "immediate" };
  switch (code) {
    case 1000: // normal: the server ends only a session the client closed
    case 1007: // invalid UTF-8: a client bug, reconnecting repeats it
    case 1009: // message too big: likewise
      return { action: "stop" };
    case 1001: // going away: the server is shutting down
    case 1012: // service restart
      return { action: "immediate" };
    // 1002, 1003 and 1008 come from proxies and WebSocket stacks (the
    // server refuses with 4002 and 4003), 1006 from the network, 3000-3999
    // and 4300-4999 are not Switchboard's: keep trying, slowly.
    default:
      return { action: "backoff", minDelayMs: 0 };
  }
}

/**
 * The rule for an HTTP refusal of the upgrade, with its `Retry-After` in
 * ms when one was seen (Node with `ws` only: a browser sees a refused
 * upgrade as close 1006, like a network failure).
 */
export function afterHttpRefusal(status: number, retryAfterMs?: number): Next {
  // 400, 401, 403, 404, ...: the same request would be refused again; 408
  // (a proxy's timeout) and 429 (a connection limit) lift.
  if (status >= 400 && status <= 499 && status !== 408 && status !== 429) return { action: "stop" };
  return { action: "backoff", minDelayMs: retryAfterMs ?? 0 };
}

/** An HTTP `Retry-After` value (seconds, or an HTTP date) in ms from `now`. */
export function parseRetryAfter(value: string | undefined, now: number = Date.now()): number | undefined {
  if (value === undefined) return undefined;
  const v = value.trim();
  if (/^\d+$/.test(v)) return Number(v) * 1000;
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - now);
}

/**
 * How a request refused with error `code` is retried (a `send` with the
 * same `key`): after the error's `retry_after_ms`, after a backoff step, or
 * not at all (`undefined`: the error is the application's).
 */
export function retryForError(code: string): "retry_after_ms" | "backoff" | undefined {
  switch (code) {
    case "rate_limited":
    case "unavailable":
      return "retry_after_ms";
    case "internal":
      return "backoff";
    default:
      return undefined;
  }
}

/** The delay before a refused request goes out again, after its `refusals`
 * consecutive refusals (1 for the first); `random` returns [0, 1). */
export function retryDelay(code: string, retryAfterMs: number | undefined, refusals: number, o: BackoffOptions, random: () => number): number | undefined {
  const how = retryForError(code);
  if (how === undefined) return undefined;
  if (how === "retry_after_ms" && retryAfterMs !== undefined) return retryAfterMs;
  return delayFor({ action: "backoff", minDelayMs: 0 }, Math.max(0, refusals - 1), o, random);
}

export interface BackoffOptions {
  /** First backoff delay. Default 500 ms. */
  initialMs: number;
  /** Largest backoff delay. Default 30 000 ms. */
  maxMs: number;
  /** Growth per failed attempt. Default 2. */
  factor: number;
  /** Fraction of each delay that is random (0: none, 1: "full jitter"). Default 0.5. */
  jitter: number;
  /** Upper bound of the random delay of an "immediate" reconnect, spreading
   * a fleet that a restart disconnected all together. Default 1 000 ms. */
  immediateJitterMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = {
  initialMs: 500,
  maxMs: 30_000,
  factor: 2,
  jitter: 0.5,
  immediateJitterMs: 1000,
};

/**
 * The delay before reconnect attempt `attempt` (0 for the first after a
 * good connection), or undefined to stop. `random` returns [0, 1).
 */
export function delayFor(next: Next, attempt: number, o: BackoffOptions, random: () => number): number | undefined {
  switch (next.action) {
    case "stop":
      return undefined;
    case "immediate":
      return Math.floor(random() * o.immediateJitterMs);
    case "backoff": {
      const base = Math.min(o.maxMs, o.initialMs * Math.pow(o.factor, attempt));
      const jittered = base * (1 - o.jitter * random());
      return Math.max(next.minDelayMs, Math.floor(jittered));
    }
  }
}
