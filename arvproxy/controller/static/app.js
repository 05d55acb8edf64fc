// The container services page: lists the user's containers and their ports, and opens a port
// with a short-lived token scoped to it.  No framework; everything comes from this host.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const API_HEADERS = { "X-Requested-With": "arvproxy", Accept: "application/json" };
  let pollSeconds = 3;
  let timer = null;
  let lastSummary = "";
  const cards = new Map(); // request uuid -> {element, json}

  function setStatus(text) {
    // The live region is announced only when its text changes.
    if ($("status").textContent !== text) {
      $("status").textContent = text;
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child);
      }
    }
    return node;
  }

  function when(iso) {
    if (!iso) return "—";
    const moment = new Date(iso);
    return moment.toLocaleString();
  }

  function portName(item, port) {
    return port.label ? `${port.label} (port ${port.port})` : `Port ${port.port}`;
  }

  function renderPort(item, port) {
    const badges = [el("span", { class: "badge " + port.access, text: port.access === "public" ? "Public" : "Private" })];
    if (port.listening) badges.push(el("span", { class: "badge listening", text: "Listening" }));
    else if (port.declared) badges.push(el("span", { class: "badge", text: "Declared" }));
    const button = el("button", {
      type: "button",
      class: "connect",
      "data-uuid": item.uuid,
      "data-port": String(port.port),
      "data-access": port.access,
      "data-url": port.url,
      "aria-label": `Connect to ${portName(item, port)} of ${item.name || item.uuid}`,
      disabled: !item.can_connect,
      text: "Connect",
    });
    return el("li", { class: "port" },
      el("span", { class: "port-name", text: portName(item, port) }),
      ...badges,
      button);
  }

  function renderCard(item) {
    const title = item.name || item.uuid;
    const meta = el("dl", { class: "meta" },
      el("dt", { text: "State" }),
      el("dd", {}, el("span", { class: "state state-" + item.state, text: item.state }),
        item.exit_code !== null && item.exit_code !== undefined ? ` (exit code ${item.exit_code})` : ""),
      el("dt", { text: "Image" }), el("dd", {}, el("code", { text: item.image || "—" })),
      el("dt", { text: "Request" }), el("dd", {}, el("code", { text: item.uuid })),
      el("dt", { text: "Started" }), el("dd", { text: when(item.started_at) }),
      el("dt", { text: "Finished" }), el("dd", { text: when(item.finished_at) }));
    let ports;
    if (item.ports.length) {
      ports = el("ul", { class: "ports", "aria-label": `Ports of ${title}` },
        ...item.ports.map((port) => renderPort(item, port)));
    } else if (item.state === "Running") {
      ports = el("p", { class: "help", text: "No ports yet: they appear here as soon as the service listens." });
    } else {
      ports = el("p", { class: "help", text: "No ports." });
    }
    const note = item.state !== "Running" && item.ports.length
      ? el("p", { class: "help", text: item.state === "Complete" || item.state === "Cancelled"
        ? "This container has finished: its ports can no longer be opened."
        : "Ports can be opened once the container is running." })
      : null;
    // Why it failed or ended (runtime_status), and where its output is kept.
    const finished = item.state === "Complete" || item.state === "Cancelled";
    const reason = item.reason || item.reason_detail
      ? el("div", { class: "reason", role: "note" },
        el("p", {}, el("strong", { text: finished ? "Why it ended: " : "Problem: " }),
          item.reason || item.reason_detail),
        item.reason && item.reason_detail ? el("p", { class: "detail", text: item.reason_detail }) : null)
      : null;
    const logs = el("p", { class: "logs" },
      el("a", { href: item.logs_url, "aria-label": `Logs of ${title}`, text: "Logs" }));
    // Why this person may not connect even while it runs (read-only, prohibited, turned off).
    const refusal = item.note ? el("p", { class: "help refusal", text: item.note }) : null;
    return el("li", { class: "card", "data-uuid": item.uuid },
      el("h3", { text: title }), meta, reason, logs, el("h4", { text: "Ports" }), ports, note,
      refusal);
  }

  function render(document_) {
    pollSeconds = document_.poll_seconds || pollSeconds;
    const list = $("list");
    const seen = new Set();
    let previous = null;
    for (const item of document_.items) {
      seen.add(item.uuid);
      const json = JSON.stringify(item);
      let entry = cards.get(item.uuid);
      if (!entry || entry.json !== json) {
        const focused = entry && entry.element.contains(document.activeElement)
          ? document.activeElement.getAttribute("data-port") : null;
        const element = renderCard(item);
        if (entry) entry.element.replaceWith(element);
        entry = { element, json };
        cards.set(item.uuid, entry);
        if (focused) {
          const again = element.querySelector(`button[data-port="${focused}"]`);
          if (again) again.focus();
        }
      }
      // Keep the order of the answer, moving nodes only when needed (moving drops focus).
      const expected = previous ? previous.nextSibling : list.firstChild;
      if (expected !== entry.element) {
        list.insertBefore(entry.element, expected);
      }
      previous = entry.element;
    }
    for (const [uuid, entry] of cards) {
      if (!seen.has(uuid)) {
        entry.element.remove();
        cards.delete(uuid);
      }
    }
    $("empty").hidden = document_.items.length > 0;
    const running = document_.items.filter((i) => i.state === "Running").length;
    const ports = document_.items.reduce((n, i) => n + (i.state === "Running" ? i.ports.length : 0), 0);
    const summary = document_.items.length
      ? `${running} running container${running === 1 ? "" : "s"}, ${ports} port${ports === 1 ? "" : "s"} to open.`
      : "No running or recent containers.";
    if (summary !== lastSummary) {
      lastSummary = summary;
      setStatus(summary);
    }
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
  }

  function showSignIn() {
    $("sign-in").hidden = false;
    $("containers").hidden = true;
    $("sign-out").hidden = true;
    cards.clear();
    $("list").replaceChildren();
  }

  function showContainers() {
    $("sign-in").hidden = true;
    $("containers").hidden = false;
    $("sign-out").hidden = false;
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const response = await fetch("/api/containers", {
        headers: API_HEADERS, credentials: "same-origin", cache: "no-store",
      });
      if (response.status === 401) {
        showSignIn();
        setStatus("Sign in to see your containers.");
        return; // Polling resumes after signing in (the form reloads the page).
      }
      const document_ = await response.json();
      if (!response.ok) {
        if (response.status === 403) {
          showSignIn();
        }
        setStatus((document_.errors || ["The list could not be loaded."]).join(" ") + " Retrying…");
      } else {
        showContainers();
        render(document_);
      }
    } catch (error) {
      setStatus("Cannot reach the server. Retrying…");
    }
    timer = setTimeout(poll, pollSeconds * 1000);
  }

  async function connect(button) {
    const { uuid, port, access, url } = button.dataset;
    if (access === "public") {
      // Anyone may open a public port: no token needed at all.
      window.open(url, "_blank", "noopener,noreferrer");
      setStatus(`Opened port ${port} in a new tab.`);
      return;
    }
    // Open the tab now, while this is still a user action, so no popup blocker stops it.
    const tab = window.open("", "_blank");
    if (tab) tab.opener = null;
    button.disabled = true;
    setStatus(`Opening port ${port}…`);
    try {
      const response = await fetch("/api/connect", {
        method: "POST",
        headers: { ...API_HEADERS, "Content-Type": "application/json" },
        credentials: "same-origin",
        cache: "no-store",
        body: JSON.stringify({ uuid, port: Number(port) }),
      });
      const answer = await response.json();
      if (!response.ok) {
        throw new Error((answer.errors || ["The port could not be opened."]).join(" "));
      }
      if (tab) {
        tab.location.replace(answer.url);
        setStatus(`Opened port ${port} in a new tab.`);
      } else {
        setStatus(`Your browser blocked the new tab. Allow pop-ups for this page and try again.`);
      }
    } catch (error) {
      if (tab) tab.close();
      setStatus(`Port ${port} could not be opened: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.connect");
    if (button && !button.disabled) {
      connect(button);
    }
  });

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !$("containers").hidden) poll();
  });

  document.addEventListener("DOMContentLoaded", () => {
    const params = new URLSearchParams(window.location.search);
    if (params.get("signin") === "failed") {
      $("sign-in-error").hidden = false;
      history.replaceState(null, "", "/");
    }
    poll();
  });
})();
