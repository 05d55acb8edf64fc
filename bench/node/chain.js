// One hop of the http-proxy two-hop chain that `make bench` compares arvproxy with.
//
//   node chain.js front   LISTEN_PORT GATEWAY_PORT CERT_FILE            (plain HTTP in, TLS out)
//   node chain.js gateway LISTEN_PORT SERVICE_PORT CERT_FILE KEY_FILE   (TLS in, plain HTTP out)
//
// The front trusts exactly the gateway's self-signed certificate (its only CA), like arvproxy's
// pinned hop.  Both hops reuse upstream connections (keep-alive agents), as
// configurable-http-proxy does.  Loopback only.
"use strict";
const fs = require("fs");
const http = require("http");
const https = require("https");
const httpProxy = require("http-proxy");

const [role, listenPort, upstreamPort, certFile, keyFile] = process.argv.slice(2);

function failed(err, req, res) {
  if (res && res.writeHead && !res.headersSent) {
    res.writeHead(502, { "content-type": "text/plain" });
  }
  if (res && res.end) res.end(String(err));
}

let server;
if (role === "front") {
  const ca = fs.readFileSync(certFile);
  const agent = new https.Agent({ keepAlive: true, maxSockets: 64, ca });
  const proxy = httpProxy.createProxyServer({
    target: { protocol: "https:", host: "127.0.0.1", port: Number(upstreamPort), ca },
    agent,
    secure: true,
    ws: true,
  });
  proxy.on("error", failed);
  server = http.createServer((req, res) => proxy.web(req, res));
  server.on("upgrade", (req, socket, head) => proxy.ws(req, socket, head));
} else if (role === "gateway") {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const proxy = httpProxy.createProxyServer({
    target: { host: "127.0.0.1", port: Number(upstreamPort) },
    agent,
    ws: true,
  });
  proxy.on("error", failed);
  const options = { cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) };
  server = https.createServer(options, (req, res) => proxy.web(req, res));
  server.on("upgrade", (req, socket, head) => proxy.ws(req, socket, head));
} else {
  console.error("usage: chain.js front|gateway LISTEN_PORT UPSTREAM_PORT CERT [KEY]");
  process.exit(2);
}
server.listen(Number(listenPort), "127.0.0.1", () => console.log(`${role} listening on ${listenPort}`));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
