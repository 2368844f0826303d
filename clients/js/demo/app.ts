// The demo chat page's script (src/demo/index.html), built on the SDK and
// bundled into src/demo/app.js by `npm run bundle-demo`. It shows what an
// application gets from the SDK: a transcript per room with each message
// once, in seq order, across reconnects and server restarts; history
// scrollback; presence; typing; the connection state. It keeps nothing
// outside the page.

import { Client, type ClientState, type Message, type Room } from "../src/index.js";

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;

const DEFAULT_ROOMS = ["general", "random"];
const TYPING_SHOWN_MS = 3000;
const PAGE = 50;

interface RoomView {
  room: Room;
  /** The transcript: seq → message. */
  messages: Map<number, Message>;
  /** Sends not yet acked, shown greyed at the end. */
  pending: Map<number, string>;
  unread: number;
  /** Whether older messages exist before the first shown. */
  more: boolean;
  typing: Map<string, ReturnType<typeof setTimeout>>;
}

let client: Client | undefined;
/** The chat is on screen: from the first `connected` of this sign-in on. */
let chatting = false;
let active = "";
let pendingId = 0;
const views = new Map<string, RoomView>();

function text(m: Message): string {
  if (m.erased) return "(erased)";
  const b = m.body as { text?: unknown } | null;
  return b && typeof b === "object" && typeof b.text === "string" ? b.text : JSON.stringify(m.body);
}

function showStatus(s: ClientState): void {
  const el = $("status");
  switch (s.state) {
    case "connecting":
      el.dataset.state = s.attempt > 0 ? "reconnecting" : "connecting";
      el.textContent = s.attempt > 0 ? `reconnecting (attempt ${s.attempt + 1})…` : "connecting…";
      break;
    case "connected":
      el.dataset.state = "connected";
      el.textContent = s.resumed ? "connected (resumed)" : "connected";
      $("me").textContent = `signed in as ${s.user}`;
      break;
    case "disconnected":
      if (s.willReconnect) {
        el.dataset.state = "reconnecting";
        el.textContent = `disconnected (${s.reason.code}); reconnecting in ${s.delayMs ?? 0} ms`;
      } else {
        el.dataset.state = "stopped";
        const why = s.reason.httpStatus ? `HTTP ${s.reason.httpStatus}` : `${s.reason.code} ${s.reason.reason}`;
        el.textContent = `disconnected: ${why}`;
      }
      break;
  }
}

function renderRooms(): void {
  const ul = $("rooms");
  ul.replaceChildren(
    ...[...views.keys()].map((name) => {
      const li = document.createElement("li");
      li.textContent = name;
      li.dataset.room = name;
      const v = views.get(name)!;
      if (name === active) li.className = "active";
      else if (v.unread > 0) {
        const badge = document.createElement("span");
        badge.className = "unread";
        badge.textContent = String(v.unread);
        li.append(badge);
      }
      li.onclick = () => select(name);
      return li;
    }),
  );
}

function messageItem(m: Message): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.seq = String(m.seq);
  if (m.erased) li.className = "erased";
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${m.seq}`;
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = m.from;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text(m);
  li.append(seq, from, body);
  return li;
}

function renderMessages(): void {
  const v = views.get(active);
  if (!v) return;
  const ol = $("messages");
  const atBottom = ol.scrollHeight - ol.scrollTop - ol.clientHeight < 40;
  const items = [...v.messages.values()].sort((a, b) => a.seq - b.seq).map(messageItem);
  for (const t of v.pending.values()) {
    const li = document.createElement("li");
    li.className = "pending";
    li.textContent = `${t} (sending…)`;
    items.push(li);
  }
  ol.replaceChildren(...items);
  if (atBottom) ol.scrollTop = ol.scrollHeight;
  ($("older") as HTMLButtonElement).hidden = !v.more;
}

function renderMembers(): void {
  const v = views.get(active);
  if (!v) return;
  const names = [...v.room.members].sort();
  $("members").replaceChildren(
    ...names.map((n) => {
      const li = document.createElement("li");
      li.textContent = n;
      return li;
    }),
  );
  $("member-count").textContent = `(${v.room.memberCount})`;
}

function renderTyping(): void {
  const v = views.get(active);
  const who = v ? [...v.typing.keys()] : [];
  $("typing").textContent = who.length === 0 ? "" : `${who.join(", ")} ${who.length === 1 ? "is" : "are"} typing…`;
}

function select(name: string): void {
  active = name;
  const v = views.get(name);
  if (v) v.unread = 0;
  $("room-title").textContent = name;
  renderRooms();
  renderMessages();
  renderMembers();
  renderTyping();
  const ol = $("messages");
  ol.scrollTop = ol.scrollHeight;
}

async function loadOlder(v: RoomView): Promise<void> {
  const first = Math.min(...v.messages.keys(), (v.room.lastSeq ?? 0) + 1);
  if (first <= 1) {
    v.more = false;
    return;
  }
  const page = await v.room.history({ before: first, limit: PAGE });
  for (const m of page.messages) v.messages.set(m.seq, m);
  v.more = page.more;
}

function open(name: string): void {
  if (views.has(name)) return select(name);
  if (!client) return;
  const room = client.room(name);
  const v: RoomView = { room, messages: new Map(), pending: new Map(), unread: 0, more: true, typing: new Map() };
  views.set(name, v);
  room.on("message", (m) => {
    v.messages.set(m.seq, m);
    const who = v.typing.get(m.from);
    if (who) {
      clearTimeout(who);
      v.typing.delete(m.from);
      if (name === active) renderTyping();
    }
    if (name === active) renderMessages();
    else {
      v.unread++;
      renderRooms();
    }
  });
  room.on("presence", () => name === active && renderMembers());
  room.on("typing", (user) => {
    clearTimeout(v.typing.get(user));
    v.typing.set(
      user,
      setTimeout(() => {
        v.typing.delete(user);
        if (name === active) renderTyping();
      }, TYPING_SHOWN_MS),
    );
    if (name === active) renderTyping();
  });
  room.on("gap", (g) => console.warn(`messages ${g.fromSeq}-${g.toSeq} of ${g.room} were not delivered (${g.reason})`));
  room
    .join()
    .then(() => loadOlder(v))
    .then(() => name === active && renderMessages())
    .catch((e) => console.error(`join ${name}`, e));
  select(name);
}

/** Until the first connection, the sign-in card alone says how it goes. */
function showSignInProgress(s: ClientState): void {
  switch (s.state) {
    case "connecting":
      $("login-status").textContent = s.attempt > 0 ? `Connecting (attempt ${s.attempt + 1})…` : "Connecting…";
      break;
    case "connected":
      $("login-status").textContent = "";
      break;
    case "disconnected":
      if (s.willReconnect) {
        $("login-status").textContent = `Cannot reach the server yet; trying again in ${s.delayMs ?? 0} ms…`;
      } else {
        // Refused for good (a bad token, a name the server rejects): the
        // card stays for another try.
        const why = s.reason.httpStatus ? `HTTP ${s.reason.httpStatus}` : `${s.reason.code} ${s.reason.reason}`.trim();
        $("login-status").textContent = "";
        $("login-error").textContent = `Could not sign in: ${why}`;
      }
      break;
  }
}

/** Swaps the sign-in card for the chat; from then on a lost connection
 * shows in the header's status while the SDK reconnects and resumes. */
function showChat(): void {
  chatting = true;
  $("login-panel").hidden = true;
  $("status").hidden = false;
  $("chat").hidden = false;
  for (const r of DEFAULT_ROOMS) open(r);
  select(DEFAULT_ROOMS[0]!);
  ($("text") as HTMLInputElement).focus();
}

function start(name: string, token: string): void {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const opts: ConstructorParameters<typeof Client>[0] = { url: `${scheme}://${location.host}/ws` };
  if (token) opts.token = () => token;
  else opts.user = name;
  // Enter again before the first connection starts over with what the
  // form says now; the abandoned client's last events are ignored.
  const abandoned = client;
  client = undefined;
  abandoned?.close();
  $("login-error").textContent = "";
  $("login-status").textContent = "Connecting…";
  const c = new Client(opts);
  client = c;
  c.on("state", (s) => {
    if (c !== client) return;
    showStatus(s);
    if (chatting) return;
    showSignInProgress(s);
    if (s.state === "connected") showChat();
  });
  c.on("error", (e) => console.warn("server error", e));
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = ($("name") as HTMLInputElement).value.trim();
  const token = ($("token") as HTMLInputElement).value.trim();
  if (!/^[A-Za-z0-9_.@-]{1,64}$/.test(name) && !token) {
    $("login-error").textContent = "A name is 1 to 64 letters, digits, or _ . @ -";
    return;
  }
  start(name, token);
});

$("add-room").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("new-room") as HTMLInputElement;
  const name = input.value.trim();
  if (/^[A-Za-z0-9_.:@-]{1,128}$/.test(name)) open(name);
  input.value = "";
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("text") as HTMLInputElement;
  const body = input.value;
  const v = views.get(active);
  if (!body || !v) return;
  input.value = "";
  const id = pendingId++;
  v.pending.set(id, body);
  renderMessages();
  v.room
    .send({ text: body })
    .catch((err) => console.error("send failed", err))
    .finally(() => {
      v.pending.delete(id);
      if (v.room.name === active) renderMessages();
    });
});

$("text").addEventListener("input", () => views.get(active)?.room.typing());

$("older").addEventListener("click", () => {
  const v = views.get(active);
  if (v) void loadOlder(v).then(renderMessages);
});
