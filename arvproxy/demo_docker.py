"""
The demo's real container: a small web site that busybox httpd serves from inside a Docker
container without any network, and the checks that say whether this machine can run it.

The container runs the locally built test image (C{scripts/build-test-image}: Debian's
busybox-static in an empty root file system).  Its command writes the site, then runs
C{httpd} bound to 127.0.0.1 inside the container; the gateway reaches that address from inside
the container's network namespace.  The site is:

  - C{/index.html}: says where it is served from and shows the container's public URL, which it
    reads from C{$ARVADOS_CONTAINER_WEB_URL_<port>} when the container starts;
  - C{/cgi-bin/request}: a shell CGI answering C{text/plain}: C{count=N} (a counter kept in
    C{/tmp}), then the request's C{HTTP_*} variables (the headers the service received) and
    C{REMOTE_ADDR}, one C{NAME=value} a line; a token cookie, should one ever arrive, is
    shown redacted.  The page's script fetches it every second.
"""

from __future__ import annotations

import os
import subprocess

from arvproxy.gateway.docker_runtime import WEB_URL_VARIABLE

DEMO_IMAGE = "arvproxy-test/busybox:1"
DEMO_PORT = 8080
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_IMAGE = os.path.join(SOURCE_ROOT, "scripts", "build-test-image")

ENSURE_DOCKER_FIX = (
    "run `scripts/ensure-docker` as root (it installs and starts a Docker engine), "
    "then `make run` again"
)

_URL_MARK = "@ARVPROXY_WEB_URL@"
_END = "ARVPROXY_END_OF_FILE"

_INDEX = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>arvproxy demo: a Docker container</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto;
       padding: 0 1rem; color: #1b1b1b; }
h1 { font-size: 1.5rem; margin-bottom: .25rem; }
.sub { color: #555; margin-top: 0; }
.facts th { text-align: left; padding-right: 1rem; font-weight: normal; color: #555; }
.facts td { font-family: ui-monospace, monospace; }
.checks { list-style: none; padding: 0; }
.checks li { padding: .35rem .75rem; margin: .3rem 0; border-left: 4px solid #999; }
.ok { border-color: #2e7d32 !important; background: #edf7ee; }
.bad { border-color: #c62828 !important; background: #fdecea; }
.counter { font-size: 1.2rem; padding: .75rem 1rem; background: #f3f6fa;
           border-left: 4px solid #1a5fb4; }
#counter { font-weight: bold; font-variant-numeric: tabular-nums; }
table.headers { border-collapse: collapse; width: 100%; font-size: 13px; }
.headers th, .headers td { text-align: left; padding: .25rem .5rem;
                           border-bottom: 1px solid #ddd; vertical-align: top; }
.headers td { font-family: ui-monospace, monospace; word-break: break-all; }
</style>
</head>
<body>
<h1>Hello from inside a Docker container</h1>
<p class="sub">This page is served by busybox httpd on 127.0.0.1:@PORT@ inside a Docker container
with no network (<code>--network none</code>), reached through arvproxy:
controller &rarr; node gateway &rarr; the container's own network namespace.</p>
<table class="facts">
<tr><th>Public URL</th><td id="web-url">@ARVPROXY_WEB_URL@</td></tr>
<tr><th>Network interfaces</th><td>@INTERFACES@</td></tr>
<tr><th>Served by</th><td>busybox httpd, 127.0.0.1:@PORT@</td></tr>
</table>
<p class="counter">Live counter, from <code>/cgi-bin/request</code> through the proxy every second:
<span id="counter">not yet</span> <span id="counter-status"></span></p>
<ul class="checks" id="checks"><li>Waiting for the first answer&hellip;</li></ul>
<h2>Headers the service received</h2>
<table class="headers" id="headers"><tr><th>Name</th><th>Value</th></tr></table>
<script>
function headerName(variable) {
  return variable.slice(5).toLowerCase().split("_")
    .map(function (w) { return w.charAt(0).toUpperCase() + w.slice(1); }).join("-");
}
function row(cells, tag) {
  const tr = document.createElement("tr");
  cells.forEach(function (text, i) {
    const cell = document.createElement(i === 0 ? "th" : tag);
    cell.textContent = text;
    tr.appendChild(cell);
  });
  return tr;
}
function show(text) {
  const vars = {};
  text.split("\\n").forEach(function (line) {
    const at = line.indexOf("=");
    if (at > 0) { vars[line.slice(0, at)] = line.slice(at + 1); }
  });
  document.getElementById("counter").textContent = vars.count || "?";
  const names = Object.keys(vars).filter(function (k) { return k.startsWith("HTTP_"); }).sort();
  const cookie = vars.HTTP_COOKIE || "";
  const arvados = names.filter(function (k) { return k.startsWith("HTTP_X_ARVADOS_"); });
  const forwarded = ["HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST"];
  const checks = [
    [cookie.indexOf("arvados_api_token") < 0,
     cookie.indexOf("arvados_api_token") < 0
       ? "No arvados_api_token cookie reached this container"
       : "The arvados_api_token cookie reached this container!"],
    [forwarded.every(function (k) { return vars[k]; }),
     "X-Forwarded-* set by the proxy: " + forwarded.map(function (k) {
       return headerName(k).slice(12) + "=" + (vars[k] || "(missing)"); }).join(", ")],
    [arvados.length === 0,
     arvados.length === 0 ? "No x-arvados-* header reached this container"
       : "x-arvados-* headers reached this container: " + arvados.map(headerName).join(", ")],
    [true, "The gateway connected from " + (vars.REMOTE_ADDR || "?") +
     ", inside the container's network namespace"],
  ];
  const list = document.getElementById("checks");
  list.textContent = "";
  checks.forEach(function (check) {
    const li = document.createElement("li");
    li.className = check[0] ? "ok" : "bad";
    li.textContent = (check[0] ? "\\u2714 " : "\\u2718 ") + check[1];
    list.appendChild(li);
  });
  const table = document.getElementById("headers");
  table.textContent = "";
  table.appendChild(row(["Name", "Value"], "th"));
  names.forEach(function (k) { table.appendChild(row([headerName(k), vars[k]], "td")); });
}
async function tick() {
  const status = document.getElementById("counter-status");
  try {
    const response = await fetch("cgi-bin/request", {cache: "no-store"});
    show(await response.text());
    status.textContent = "(HTTP " + response.status + ")";
  } catch (e) {
    status.textContent = "(fetch failed: " + e + ")";
  }
}
tick();
setInterval(tick, 1000);
</script>
</body>
</html>
"""

_CGI = r"""#!/bin/sh
n=$(( $(cat /tmp/count 2>/dev/null || echo 0) + 1 ))
echo "$n" > /tmp/count
printf 'Content-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n\r\n'
echo "count=$n"
busybox env | busybox grep -E '^(HTTP_[A-Z0-9_]*|REMOTE_ADDR)=' | busybox sort \
  | busybox sed 's/arvados_api_token=[^;]*/arvados_api_token=(redacted)/g'
"""


def container_command(port: int = DEMO_PORT) -> list[str]:
    """
    The demo container's command: write the site (with the container's public URL and network
    interfaces in the page), then serve it with busybox httpd on 127.0.0.1:C{port}.
    """
    url_variable = WEB_URL_VARIABLE.format(port=port)
    index = _INDEX.replace("@PORT@", str(port))
    script = f"""set -e
busybox mkdir -p /www/cgi-bin
cat > /www/cgi-bin/request <<'{_END}'
{_CGI}{_END}
busybox chmod 755 /www/cgi-bin/request
cat > /www/index.html <<'{_END}'
{index}{_END}
url=$(printf %s "${url_variable}" | busybox tr -cd 'A-Za-z0-9:/._~%?=+-')
[ -n "$url" ] || url="(not set)"
interfaces=$(busybox ls /sys/class/net | busybox tr '\\n' ' ')
busybox sed -i "s|{_URL_MARK}|$url|; s|@INTERFACES@|$interfaces|" /www/index.html
echo "serving the demo site on 127.0.0.1:{port}"
exec httpd -f -p 127.0.0.1:{port} -h /www
"""
    return ["sh", "-c", script]


def image_exists(image: str = DEMO_IMAGE) -> bool:
    """Whether the engine has C{image} (blocking)."""
    import docker.errors

    from arvproxy.gateway.docker_runtime import default_client

    try:
        default_client().images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def build_image(image: str = DEMO_IMAGE) -> tuple[str, str] | None:
    """
    Build C{image} with C{scripts/build-test-image} (blocking; can take a minute).

    @return: C{None} once built, else what went wrong (the script's last words) and the fix.
    """
    fix = "run `scripts/build-test-image` to see why (it fetches Debian's busybox-static)"
    try:
        result = subprocess.run(
            [BUILD_IMAGE, image], capture_output=True, text=True, timeout=600, cwd=SOURCE_ROOT
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the image {image} could not be built: {e}", fix
    if result.returncode != 0:
        words = result.stderr.strip().splitlines()[-3:] or [f"status {result.returncode}"]
        return f"the image {image} could not be built: " + " / ".join(words), fix
    return None


def runtime_problem() -> tuple[str, str] | None:
    """
    C{None} when this machine can run the demo's Docker container, else what is missing and the
    fix (blocking: asks the engine).
    """
    from arvproxy.gateway.docker_runtime import ENGINE_HINT, engine_status
    from arvproxy.gateway.netns import has_cap_sys_admin

    problem = engine_status()
    if problem is not None:
        detail = problem.removeprefix(ENGINE_HINT).lstrip(": ")
        return f"no Docker engine answers here ({detail})", ENSURE_DOCKER_FIX
    if not has_cap_sys_admin():
        return (
            "the gateway cannot enter a container's network namespace without root (CAP_SYS_ADMIN)",
            "run `make run` as root (e.g. `sudo make run`)",
        )
    return None
