// Reference for the benchmarks: a Node.js `ws` broadcast server. Every text
// frame any client sends goes to every connected client (the sender
// included). No application logic, no storage.
//
//   node server.js [--listen 127.0.0.1:9002] [--tls-listen ADDR --cert PEM --key PEM]
//
// Prints each listening URL on stdout.
"use strict";
const fs = require("fs");
const http = require("http");
const https = require("https");
const { WebSocketServer, WebSocket } = require("ws");

const args = process.argv.slice(2);
const opt = {};
for (let i = 0; i < args.length; i += 2) opt[args[i].replace(/^--/, "")] = args[i + 1];
if (!opt.listen && !opt["tls-listen"]) opt.listen = "127.0.0.1:9002";

const clients = new Set();

function start(addr, server, scheme) {
  const i = addr.lastIndexOf(":");
  const host = addr.slice(0, i);
  const port = Number(addr.slice(i + 1));
  const wss = new WebSocketServer({ server, perMessageDeflate: false, maxPayload: 65536 });
  wss.on("connection", (ws) => {
    clients.add(ws);
    ws.on("close", () => clients.delete(ws));
    ws.on("error", () => clients.delete(ws));
    ws.on("message", (data, isBinary) => {
      if (isBinary) return;
      for (const c of clients) {
        if (c.readyState === WebSocket.OPEN) c.send(data, { binary: false });
      }
    });
  });
  server.listen(port, host, () => {
    const a = server.address();
    console.log(`${scheme}://${a.address}:${a.port}/ws`);
  });
}

if (opt.listen) start(opt.listen, http.createServer(), "ws");
if (opt["tls-listen"]) {
  const server = https.createServer({ cert: fs.readFileSync(opt.cert), key: fs.readFileSync(opt.key) });
  start(opt["tls-listen"], server, "wss");
}
