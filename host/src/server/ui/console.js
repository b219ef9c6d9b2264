// The console's live parts, and nothing else: the routing page's candidates
// (re-read from the native API every 2 s) and the events page (the meter
// event stream). Both read the API with the session cookie; no key here.
"use strict";

function cell(row, text, header) {
  const element = document.createElement(header ? "th" : "td");
  if (header) element.scope = "row";
  element.textContent = text === null || text === undefined || text === "" ? "—" : String(text);
  row.appendChild(element);
}

function routeLive(container) {
  const profile = container.dataset.profile;
  const body = container.querySelector("tbody");
  const chosen = document.getElementById("chosen");
  async function refresh() {
    try {
      const response = await fetch("/api/v1/route/" + encodeURIComponent(profile),
        { credentials: "same-origin", headers: { accept: "application/json" } });
      if (!response.ok) return;
      const view = await response.json();
      body.replaceChildren();
      for (const candidate of view.candidates) {
        const row = document.createElement("tr");
        cell(row, candidate.name, true);
        cell(row, candidate.rank);
        cell(row, candidate.kind);
        cell(row, candidate.eligible ? "yes" : "no");
        cell(row, candidate.estimate);
        cell(row, candidate.latency_ms === null ? null : candidate.latency_ms + " ms");
        cell(row, candidate.breaker);
        cell(row, candidate.reason);
        body.appendChild(row);
      }
      if (chosen) chosen.textContent = view.chosen || "—";
    } catch (_) { /* the next tick tries again */ }
  }
  setInterval(refresh, 2000);
}

function eventsLive(container) {
  const body = container.querySelector("tbody");
  const status = document.getElementById("events-status");
  let first = true;
  function add(event) {
    if (first) { body.replaceChildren(); first = false; }
    const data = event.data || {};
    const row = document.createElement("tr");
    row.dataset.id = event.id;
    cell(row, event.time, true);
    cell(row, event.type);
    cell(row, data.tenant);
    cell(row, data.sandbox_id);
    cell(row, data.amount !== undefined ? data.amount : data.state);
    // Two outboxes (money, lifecycle) arrive in turn: keep the table in
    // time order, newest first, whichever sent the event.
    row.dataset.time = event.time || "";
    let before = body.firstChild;
    while (before && before.dataset.time > row.dataset.time) before = before.nextSibling;
    body.insertBefore(row, before);
    while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
  }
  // Server-sent events read by fetch, so every event type arrives through
  // one parser; the stream ends when the server stops.
  async function listen() {
    try {
      const response = await fetch(container.dataset.source, { credentials: "same-origin" });
      if (!response.ok) { status.textContent = "The event stream answered " + response.status + "."; return; }
      status.textContent = "Live: new events appear at the top.";
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
          if (data) { try { add(JSON.parse(data)); } catch (_) { /* not an event */ } }
        }
      }
      status.textContent = "The event stream ended (the server stopped?). Reload to reconnect.";
    } catch (error) {
      status.textContent = "The event stream failed: " + error;
    }
  }
  listen();
}

document.addEventListener("DOMContentLoaded", () => {
  const route = document.getElementById("route-live");
  if (route) routeLive(route);
  const events = document.getElementById("events-live");
  if (events) eventsLive(events);
});
