// What to do after a connection ends: the close-code classes of
// PROTOCOL.md section 9 and the HTTP refusals of section 2, turned into
// "stop", "reconnect at once" or "back off", and the backoff delays. Pure
// functions: no timers, no I/O, so every rule is unit-testable.

/** What the client does after a close. */
export type Next =
  | { action: "stop" }
  | { action: "now" }
  | { action: "backoff"; minDelayMs: number };

/** The server-advised delay in a close reason, `retry_after_ms=N`. */
export function retryAfterFromReason(reason: string): number | undefined {
  const m = /retry_after_ms=(\d+)/.exec(reason);
  return m ? Number(m[1]) : undefined;
}

/**
 * The rule for a WebSocket close code. `byClient` is true when the
 * application closed the client itself.
 */
export function afterClose(code: number, reason: string, byClient: boolean): Next {
  if (byClient) return { action: "stop" };
  if (code >= 4000 && code <= 4099) return { action: "stop" };
  if (code >= 4100 && code <= 4199) {
    return { action: "backoff", minDelayMs: retryAfterFromReason(reason) ?? 0 };
  }
  if (code >= 4200 && code <= 4299) return { action: "now" };
  switch (code) {
    case 1000: // normal: the server ends only a session the client closed
    case 1002: // protocol error
    case 1003: // unsupported data
    case 1007: // invalid UTF-8: a client bug, reconnecting repeats it
    case 1008: // policy violation
    case 1009: // message too big: likewise
      return { action: "stop" };
    case 1001: // going away: the server is shutting down
    case 1012: // service restart
      return { action: "now" };
    default: // 1006 (no close frame: the network or a crash), 1011, 1013, ...
      return { action: "backoff", minDelayMs: 0 };
  }
}

/** The rule for an HTTP refusal of the upgrade (seen in Node with `ws`, never in browsers). */
export function afterHttpRefusal(status: number): Next {
  if (status === 429 || status === 503 || status >= 500) return { action: "backoff", minDelayMs: 0 };
  // 400, 401, 403, 404: the same request would be refused again.
  return { action: "stop" };
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
  /** Upper bound of the random delay of an "at once" reconnect, spreading a
   * fleet that a restart disconnected all together. Default 1 000 ms. */
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
    case "now":
      return Math.floor(random() * o.immediateJitterMs);
    case "backoff": {
      const base = Math.min(o.maxMs, o.initialMs * Math.pow(o.factor, attempt));
      const jittered = base * (1 - o.jitter * random());
      return Math.max(next.minDelayMs, Math.floor(jittered));
    }
  }
}
