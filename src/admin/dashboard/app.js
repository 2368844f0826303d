// Switchboard live dashboard. Plain JS, no dependencies, works offline.
//
// The admin token is typed in once, kept in this tab's sessionStorage and
// sent only as an `Authorization: Bearer` header to this origin's admin API.
// It never goes into a URL. Everything shown is read from /admin/api.
"use strict";

(() => {
  const TOKEN_KEY = "switchboard.adminToken";
  const POLL_MS = 1000;          // stats (tiles and chart)
  const TABLES_EVERY = 2;        // rooms and connections every 2nd poll
  const HISTORY_SECONDS = 300;   // the chart's window
  const ROOMS_SHOWN = 10;
  const CONNECTIONS_SHOWN = 100;
  const COLORS = { in: "#4fa3ff", out: "#3ccf8e", grid: "#2a3540", text: "#8a96a3" };

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let prevStats = null;
  let series = [];               // [{t, in, out}] in seconds since epoch
  const prevRooms = new Map();   // room -> {seq, t}
  let tick = 0;
  let timer = null;

  class Unauthorized extends Error {}

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers, { Authorization: "Bearer " + token });
    const r = await fetch("/admin/api" + path, Object.assign({}, options, { headers, cache: "no-store" }));
    if (r.status === 401) throw new Unauthorized("the admin token was refused");
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.message || (path + ": HTTP " + r.status));
    return body;
  }

  // ---- formatting --------------------------------------------------------
  const fmtInt = (n) => Math.round(n).toLocaleString("en-US");
  function fmtRate(n) {
    if (!isFinite(n)) return "–";
    return n >= 100 ? fmtInt(n) : n.toFixed(1);
  }
  function fmtSeconds(s) {
    if (s === null || !isFinite(s)) return "–";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + " ms";
    return s.toFixed(2) + " s";
  }
  function fmtBytes(b) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return (i === 0 ? b.toFixed(0) : b.toFixed(1)) + " " + units[i];
  }
  function fmtDuration(s) {
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    return m + "m " + (s % 60) + "s";
  }
  const fmtTime = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  // ---- tiles and chart -----------------------------------------------------
  // Average of a histogram over the last interval: delta sum / delta count.
  function intervalAvg(now, prev, name) {
    if (!prev) return null;
    const dc = now[name + "_count"] - prev[name + "_count"];
    if (dc <= 0) return null;
    return (now[name + "_sum"] - prev[name + "_sum"]) / dc;
  }

  function showStats(s) {
    $("conn-open").textContent = fmtInt(s.connections_open);
    $("rooms-count").textContent = fmtInt(s.rooms);
    $("queue-bytes").textContent = fmtBytes(s.outbound_queue_bytes);
    $("slow").textContent = fmtInt(s.slow_consumers_total);
    $("uptime").textContent = "up " + fmtDuration(s.uptime_seconds);
    const ready = $("ready");
    ready.textContent = s.ready ? "ready" : "draining";
    ready.className = "pill " + (s.ready ? "ok" : "bad");

    if (prevStats) {
      const dt = (s.ts_ms - prevStats.ts_ms) / 1000;
      if (dt > 0) {
        const rin = Math.max(0, s.messages_received_total - prevStats.messages_received_total) / dt;
        const rout = Math.max(0, s.messages_delivered_total - prevStats.messages_delivered_total) / dt;
        const commits = Math.max(0, s.store_commits_total - prevStats.store_commits_total) / dt;
        $("rate-in").textContent = fmtRate(rin);
        $("rate-out").textContent = fmtRate(rout);
        $("commit-rate").textContent = fmtRate(commits) + " commits/s";
        series.push({ t: s.ts_ms / 1000, in: rin, out: rout });
      }
      const commit = intervalAvg(s, prevStats, "store_commit_seconds");
      const ack = intervalAvg(s, prevStats, "ack_latency_seconds");
      if (commit !== null) $("commit-latency").textContent = fmtSeconds(commit);
      if (ack !== null) $("ack-latency").textContent = fmtSeconds(ack);
    }
    const cutoff = s.ts_ms / 1000 - HISTORY_SECONDS;
    series = series.filter((p) => p.t >= cutoff);
    prevStats = s;
    drawChart(s.ts_ms / 1000);
  }

  // The chart's top: four grid steps of a round size (1, 1.5, 2, 2.5, 3,
  // 4, 5, 6 or 8 times a power of ten).
  function niceMax(v) {
    const step = Math.max(v / 4, 1);
    const p = Math.pow(10, Math.floor(Math.log10(step)));
    for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (step <= m * p) return 4 * m * p;
    return 40 * p;
  }

  function drawChart(now) {
    const canvas = $("chart");
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 56, right = 10, top = 10, bottom = 24;
    const pw = w - left - right, ph = h - top - bottom;
    const ymax = niceMax(Math.max(0, ...series.map((p) => Math.max(p.in, p.out))));
    const x = (t) => left + pw * (1 - (now - t) / HISTORY_SECONDS);
    const y = (v) => top + ph * (1 - v / ymax);

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = COLORS.text;
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = ymax * i / 4, yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy); ctx.stroke();
      ctx.fillText(Number.isInteger(v) ? fmtInt(v) : v.toFixed(1), left - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let m = 0; m <= HISTORY_SECONDS / 60; m++) {
      const xx = Math.round(x(now - m * 60)) + 0.5;
      ctx.fillText(m === 0 ? "now" : "-" + m + "m", xx, top + ph + 6);
    }
    for (const key of ["in", "out"]) {
      ctx.strokeStyle = COLORS[key];
      ctx.lineWidth = 2;
      ctx.beginPath();
      series.forEach((p, i) => {
        const px = x(p.t), py = y(p[key]);
        if (i === 0) ctx.moveTo(px, py); else ctx.lineTo(px, py);
      });
      ctx.stroke();
    }
  }

  // ---- tables ----------------------------------------------------------------
  function showRooms(list, nowMs) {
    const t = nowMs / 1000;
    const rows = list.rooms.map((r) => {
      const prev = prevRooms.get(r.name);
      const rate = prev && t > prev.t ? Math.max(0, r.latest_seq - prev.seq) / (t - prev.t) : 0;
      prevRooms.set(r.name, { seq: r.latest_seq, t });
      return Object.assign({ rate }, r);
    });
    rows.sort((a, b) => b.rate - a.rate || b.sessions - a.sessions || a.name.localeCompare(b.name));
    const body = $("rooms-body");
    body.replaceChildren(...rows.slice(0, ROOMS_SHOWN).map((r) => {
      const tr = document.createElement("tr");
      tr.append(cell(r.name), cell(fmtInt(r.sessions), "num"), cell(fmtRate(r.rate), "num"),
        cell(fmtInt(r.latest_seq), "num"));
      return tr;
    }));
  }

  function showConnections(list) {
    $("conn-total").textContent = list.total > list.connections.length
      ? "(" + list.connections.length + " of " + fmtInt(list.total) + ")"
      : "(" + list.total + ")";
    const body = $("conn-body");
    body.replaceChildren(...list.connections.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.session = c.id;
      const kick = document.createElement("button");
      kick.type = "button";
      kick.className = "kick";
      kick.dataset.kick = c.id;
      kick.textContent = "Kick";
      const td = document.createElement("td");
      td.append(kick);
      tr.append(cell(c.id, "mono"), cell(c.node || "–"), cell(c.user), cell(c.remote, "mono"), cell(c.rooms.join(", ")),
        cell(fmtTime(c.connected_since_ms)), cell(fmtInt(c.messages_in), "num"),
        cell(fmtInt(c.messages_out), "num"), cell(fmtBytes(c.queue_bytes), "num"), td);
      return tr;
    }));
  }

  // One row per node of the cluster (one, `standalone`, when alone).
  function showNodes(list) {
    $("nodes-mode").textContent = list.cluster ? "(cluster of " + list.nodes.length + ")" : "(standalone)";
    const body = $("nodes-body");
    body.replaceChildren(...list.nodes.map((n) => {
      const tr = document.createElement("tr");
      tr.dataset.node = n.id;
      const state = (n.alive ? "alive" : "gone") + (n.this_node ? " · this node" : "");
      tr.append(cell(n.id, "mono"), cell(state, n.alive ? "" : "error"), cell(fmtInt(n.connections), "num"),
        cell(n.started_ms ? fmtTime(n.started_ms) : "–"), cell(n.last_seen_ms ? fmtTime(n.last_seen_ms) : "–"));
      return tr;
    }));
  }

  async function refreshTables() {
    const user = $("conn-filter").value.trim();
    const query = "?limit=" + CONNECTIONS_SHOWN + (user ? "&user=" + encodeURIComponent(user) : "");
    const [rooms, conns, nodes] = await Promise.all([
      api("/rooms?limit=50"), api("/connections" + query), api("/nodes")]);
    showRooms(rooms, Date.now());
    showConnections(conns);
    showNodes(nodes);
  }

  // ---- polling and login -----------------------------------------------------
  function status(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.className = isError ? "error" : "muted";
  }

  // The last operator action, kept until the next one.
  function note(text, isError) {
    const a = $("action");
    a.textContent = "· " + text;
    a.className = isError ? "error" : "";
  }

  async function poll() {
    timer = null;
    try {
      const s = await api("/stats");
      showStats(s);
      if (tick % TABLES_EVERY === 0) await refreshTables();
      tick++;
      status("updated " + fmtTime(s.ts_ms));
    } catch (e) {
      if (e instanceof Unauthorized) { logout(e.message); return; }
      status("update failed: " + e.message, true);
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function showDashboard() {
    $("login-panel").hidden = true;
    $("dashboard").hidden = false;
    $("logout").hidden = false;
    if (!timer) poll();
  }

  function logout(why) {
    if (timer) { clearTimeout(timer); timer = null; }
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    prevStats = null;
    series = [];
    $("dashboard").hidden = true;
    $("logout").hidden = true;
    $("login-panel").hidden = false;
    $("login-error").textContent = why || "";
    status("signed out");
    $("token").focus();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      token = $("token").value.trim();
      $("token").value = "";
      try {
        await api("/stats");
        sessionStorage.setItem(TOKEN_KEY, token);
        $("login-error").textContent = "";
        showDashboard();
      } catch (e) {
        logout(e instanceof Unauthorized ? "That token was refused." : "Cannot reach the admin API: " + e.message);
      }
    });
    $("logout").addEventListener("click", () => logout(""));
    $("conn-body").addEventListener("click", async (ev) => {
      const id = ev.target.dataset && ev.target.dataset.kick;
      if (!id) return;
      ev.target.disabled = true;
      try {
        await api("/connections/" + encodeURIComponent(id) + "/kick", { method: "POST" });
        note("kicked session " + id + " at " + fmtTime(Date.now()));
        await refreshTables();
      } catch (e) {
        if (e instanceof Unauthorized) { logout(e.message); return; }
        note("kick of " + id + " failed: " + e.message, true);
        ev.target.disabled = false;
      }
    });
    $("conn-filter").addEventListener("change", () => refreshTables().catch(() => {}));
    window.addEventListener("resize", () => prevStats && drawChart(prevStats.ts_ms / 1000));
    if (token) showDashboard(); else logout("");
  });
})();
