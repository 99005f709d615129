// The dashboard: instances pushed by the daemon (GET /api/stream, a snapshot a second), their detail and log,
// start/stop/restart/apply, the models the router serves, and a playground that streams a chat completion.

import { Api, ApiError, parseLines } from "./api.js";
import { draw, push, sparkline } from "./charts.js";
import * as fmt from "./format.js";
import { el } from "./format.js";

const HEALTH_KINDS = new Set(["healthy", "health", "unhealthy", "exited", "backoff", "restarted", "failed", "reset",
  "start-failed"]);
const ACTIVE = new Set(["starting", "running", "stopping", "backoff"]);
const MAX_LOG_LINES = 2000;
const MAX_EVENTS = 100;

const api = new Api();
const $ = (selector) => document.querySelector(selector);
const state = {
  rows: new Map(), // name -> {tr, cells, history}
  records: new Map(),
  selected: null,
  logAbort: null,
  streamAbort: null,
  chatAbort: null,
  detailEventsSeen: 0,
};
window.llamaOrchLoadedAt = Date.now(); // tests read it: a page that reloads gets a new value

// -- start-up and the key ------------------------------------------------------------------------------------

async function open() {
  try {
    const daemon = await api.json("GET", "/api/daemon");
    $("#login").hidden = true;
    $("#logout").hidden = !api.key;
    $("#daemon-info").textContent = daemon.version ? `daemon ${daemon.version}, pid ${daemon.pid ?? "-"}` : "";
    show(location.hash.slice(1) || "instances");
    stream();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      askKey(api.key ? "That key was refused (401): check api.control_keys in orchestrator.json." : "");
    } else {
      setConn(`cannot reach the daemon: ${error.message}`, "bad");
    }
  }
}

function askKey(message) {
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message;
  setConn(message ? "key refused" : "key needed", "bad");
  $("#key").focus();
}

$("#login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  api.setKey($("#key").value.trim());
  $("#key").value = "";
  open();
});

$("#logout").addEventListener("click", () => {
  api.setKey("");
  api.setRouterKey("");
  state.streamAbort?.abort();
  state.logAbort?.abort();
  location.reload();
});

function setConn(text, kind = "") {
  const conn = $("#conn");
  conn.textContent = text;
  conn.dataset.kind = kind;
}

// -- sections ------------------------------------------------------------------------------------------------

function show(view) {
  if (!["instances", "models", "playground"].includes(view)) view = "instances";
  for (const tab of document.querySelectorAll(".tab[data-view]")) {
    if (tab.dataset.view === view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  if (view === "models") loadModels();
  if (view === "playground") loadChatModels();
}

for (const tab of document.querySelectorAll(".tab[data-view]")) {
  tab.addEventListener("click", () => {
    history.replaceState(null, "", `#${tab.dataset.view}`);
    show(tab.dataset.view);
  });
}

// -- the live feed -------------------------------------------------------------------------------------------

async function stream() {
  state.streamAbort?.abort();
  const abort = (state.streamAbort = new AbortController());
  while (!abort.signal.aborted) {
    try {
      for await (const message of api.events("GET", "/api/stream", { signal: abort.signal })) {
        if (message.event === "snapshot") {
          apply(JSON.parse(message.data));
          setConn(`live, ${new Date().toLocaleTimeString()}`, "ok");
        }
      }
    } catch (error) {
      if (abort.signal.aborted) return;
      if (error instanceof ApiError && error.status === 401) {
        askKey("The key was refused (401).");
        return;
      }
    }
    setConn("disconnected: reconnecting…", "bad");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function apply(snapshot) {
  const seen = new Set();
  for (const record of snapshot.instances) {
    seen.add(record.name);
    state.records.set(record.name, record);
    const row = state.rows.get(record.name) || addRow(record.name);
    push(row.history.cpu, record.cpu_percent);
    push(row.history.rps, record.requests_per_s);
    push(row.history.tps, record.tokens_per_s);
    render(row, record);
  }
  for (const [name, row] of state.rows) {
    if (!seen.has(name)) {
      row.tr.remove();
      state.rows.delete(name);
      state.records.delete(name);
    }
  }
  $("#empty").hidden = state.rows.size > 0;
  addEvents(snapshot.events);
  if (state.selected && snapshot.events.some((e) => e.instance === state.selected)) loadDetail(state.selected);
  else if (state.selected && state.records.has(state.selected)) renderRuntime(state.records.get(state.selected));
}

function addRow(name) {
  const cell = (cls) => el("td", cls ? { class: cls } : {});
  const cells = {
    name: el("th", { scope: "row" }),
    status: cell(),
    health: cell(),
    port: cell("wide num"),
    cpu: cell("wide num"),
    memory: cell("wide num"),
    uptime: cell("wide num"),
    restarts: cell("wide num"),
    config: cell("wide"),
    rps: cell("wide num"),
    tps: cell("wide num"),
    actions: cell("actions"),
  };
  const open = el("button", { type: "button", class: "link", textContent: name, title: `Details of ${name}` });
  open.addEventListener("click", () => select(name));
  cells.name.append(open);
  const value = () => el("span", { class: "value" });
  for (const key of ["cpu", "rps", "tps"]) cells[key].append(sparkline(), value());
  const buttons = {};
  for (const [action, label] of [["start", "Start"], ["stop", "Stop"], ["restart", "Restart"], ["apply", "Apply"]]) {
    buttons[action] = el("button", { type: "button", textContent: label, dataset: { action },
      "aria-label": `${label} ${name}` });
    buttons[action].addEventListener("click", () => act(action, name));
    cells.actions.append(buttons[action]);
  }
  const tr = el("tr", { dataset: { name } }, ...Object.values(cells));
  const names = [...state.rows.keys(), name].sort();
  const before = state.rows.get(names[names.indexOf(name) + 1]);
  $("#instances tbody").insertBefore(tr, before ? before.tr : null);
  const row = { tr, cells, buttons, history: { cpu: [], rps: [], tps: [] } };
  state.rows.set(name, row);
  return row;
}

function render(row, record) {
  const { cells, buttons } = row;
  setBadge(cells.status, fmt.statusText(record), fmt.statusClass(record.status));
  setBadge(cells.health, record.health || "-", fmt.healthClass(record.health));
  cells.port.textContent = record.port ?? "-";
  const active = ACTIVE.has(record.status);
  cells.cpu.lastChild.textContent = active ? `${fmt.number(record.cpu_percent)}%` : "-";
  draw(cells.cpu.firstChild, row.history.cpu, 10);
  cells.memory.textContent = active ? fmt.bytes(record.memory_bytes) : "-";
  cells.uptime.textContent = fmt.duration(record.uptime_s);
  cells.restarts.textContent = record.restarts ?? 0;
  cells.config.textContent = record.config_removed ? "removed" : record.config_changed ? "changed" : "";
  cells.config.className = `wide ${record.config_changed || record.config_removed ? "drift" : ""}`;
  cells.rps.lastChild.textContent = fmt.number(record.requests_per_s, 2);
  draw(cells.rps.firstChild, row.history.rps, 1);
  cells.tps.lastChild.textContent = fmt.number(record.tokens_per_s);
  draw(cells.tps.firstChild, row.history.tps, 10);
  buttons.start.disabled = active || record.status === "invalid-config";
  buttons.stop.disabled = !active;
  buttons.restart.disabled = !active;
  buttons.apply.disabled = !record.config_changed;
  row.tr.dataset.status = record.status;
}

function setBadge(cell, text, cls) {
  if (cell.textContent === text && cell.firstChild?.className === `badge ${cls}`) return;
  cell.replaceChildren(el("span", { class: `badge ${cls}`, textContent: text }));
}

function eventItem(event) {
  const epoch = event.time ?? event.ts;
  return el("li", {},
    el("time", { dateTime: fmt.isoTime(epoch), textContent: fmt.localTime(epoch) }),
    event.instance ? el("span", { class: "ev-name", textContent: event.instance }) : null,
    el("span", { class: `ev-kind kind-${event.kind}`, textContent: event.kind }),
    el("span", { class: "ev-msg", textContent: event.message || "" }));
}

function addEvents(events) {
  const list = $("#events");
  for (const event of events) list.prepend(eventItem(event));
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

// -- actions -------------------------------------------------------------------------------------------------

const ACTIONS = {
  start: { confirm: null, call: (n) => api.json("POST", `/api/instances/${enc(n)}/start`) },
  stop: { confirm: (n) => `Stop ${n}? Requests in flight are cut off.`,
    call: (n) => api.json("POST", `/api/instances/${enc(n)}/stop?timeout=10`) },
  restart: { confirm: (n) => `Restart ${n}? It stops, then starts again.`,
    call: (n) => api.json("POST", `/api/instances/${enc(n)}/restart?timeout=10`) },
  apply: { confirm: (n) => `Apply the changed config to ${n}? It is recreated (stopped, then started).`,
    call: (n) => api.json("POST", `/api/instances/${enc(n)}/recreate`, { body: { wait: false } }) },
};
const enc = encodeURIComponent;

async function act(action, name) {
  const spec = ACTIONS[action];
  if (spec.confirm && !(await confirmDialog(spec.confirm(name)))) return;
  const message = $("#action-msg");
  message.className = "";
  message.textContent = `${action} ${name}…`;
  try {
    const result = await spec.call(name);
    // The answer carries the new status: show it now, the next snapshot fills in the rest.
    const status = result.status ?? result.instance?.status;
    const record = state.records.get(name);
    if (record && status) {
      Object.assign(record, { status, health: ACTIVE.has(status) ? record.health : "unknown" });
      if (!ACTIVE.has(status)) record.uptime_s = null;
      render(state.rows.get(name), record);
    }
    message.textContent = `${name}: ${action} done${status ? ` (${status})` : ""}`;
  } catch (error) {
    message.className = "error";
    message.textContent = `${name}: ${action} failed: ${error.message}`;
  }
}

function confirmDialog(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// -- detail and log ------------------------------------------------------------------------------------------

function select(name) {
  state.selected = name;
  $("#detail").hidden = false;
  $("#detail-title").textContent = name;
  $("#log").textContent = "";
  loadDetail(name);
  followLog(name);
  $("#detail-title").scrollIntoView({ block: "nearest" });
}

$("#detail-close").addEventListener("click", () => {
  state.selected = null;
  state.logAbort?.abort();
  $("#detail").hidden = true;
});

$("#log-follow").addEventListener("change", () => {
  if (state.selected) followLog(state.selected);
});

async function loadDetail(name) {
  try {
    const [detail, events] = await Promise.all([
      api.json("GET", `/api/instances/${enc(name)}`),
      api.json("GET", `/api/events?instance=${enc(name)}&limit=200`),
    ]);
    if (state.selected !== name) return;
    renderRuntime({ ...(state.records.get(name) || {}), ...detail });
    $("#detail-config").textContent = detail.config ? JSON.stringify(detail.config, null, 2)
      : detail.config_error || "no config";
    const drift = $("#detail-drift");
    if (detail.config_drift?.length) {
      const rows = detail.config_drift.map((c) => el("tr", {},
        el("td", { textContent: c.path }), el("td", { textContent: JSON.stringify(c.running) }),
        el("td", { textContent: JSON.stringify(c.declared) }), el("td", { textContent: c.needs_recreate ? "yes" : "no" })));
      drift.replaceChildren(el("table", { class: "small" },
        el("thead", {}, el("tr", {}, ...["field", "running", "declared", "recreate"].map(
          (h) => el("th", { scope: "col", textContent: h })))),
        el("tbody", {}, ...rows)));
    } else {
      drift.replaceChildren(el("p", { class: "dim", textContent: "none: it runs the declared config" }));
    }
    const health = events.filter((e) => HEALTH_KINDS.has(e.kind)).slice(-10).reverse();
    $("#detail-health").replaceChildren(...(health.length ? health.map(eventItem) : [el("li", { class: "dim", textContent: "no health events yet" })]));
    $("#detail-events").replaceChildren(...events.slice(-15).reverse().map(eventItem));
  } catch (error) {
    $("#detail-runtime").replaceChildren(el("p", { class: "error", textContent: error.message }));
  }
}

function renderRuntime(r) {
  const pairs = [
    ["status", fmt.statusText(r)], ["health", r.health], ["pid", r.pid ?? "-"], ["port", r.port ?? "-"],
    ["started", fmt.localTime(r.started_at)], ["uptime", fmt.duration(r.uptime_s)], ["restarts", r.restarts ?? 0],
    ["CPU", r.cpu_percent == null ? "-" : `${fmt.number(r.cpu_percent)}%`], ["memory", fmt.bytes(r.memory_bytes)],
    ["model", r.model ?? "-"], ["last error", r.last_error || "-"],
  ];
  $("#detail-runtime").replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: String(v) })]));
}

async function followLog(name) {
  state.logAbort?.abort();
  const abort = (state.logAbort = new AbortController());
  const pre = $("#log");
  pre.textContent = "";
  const follow = $("#log-follow").checked;
  const path = `/api/instances/${enc(name)}/logs?tail=200&format=sse${follow ? "&follow=true" : ""}`;
  try {
    for await (const message of api.events("GET", path, { signal: abort.signal })) {
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(el("span", { class: message.event === "stderr" ? "stderr" : "stdout", textContent: `${message.data}\n` }));
      while (pre.childNodes.length > MAX_LOG_LINES) pre.firstChild.remove();
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    }
  } catch (error) {
    if (!abort.signal.aborted) pre.append(el("span", { class: "error", textContent: `[log: ${error.message}]\n` }));
  }
}

// -- models --------------------------------------------------------------------------------------------------

async function routerModels() {
  try {
    return (await api.json("GET", "/v1/models", { router: true })).data || [];
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      throw new Error("the router refused the key: give an API key (api.api_keys) under Router key in the Playground");
    }
    throw error;
  }
}

async function loadModels() {
  loadFiles();
  const message = $("#models-msg");
  try {
    const models = await routerModels();
    const files = new Map([...state.records.values()].map((r) => [r.name, r.model]));
    const rows = models.map((m) => {
      const servedBy = m.instances || m.owned_by_instances || (files.has(m.id) ? [m.id] : []);
      const loaded = m.loaded ?? m.status?.value === "loaded";
      return el("tr", {},
        el("th", { scope: "row", textContent: m.id }),
        el("td", {}, el("span", { class: `badge ${loaded ? "status-running" : "status-stopped"}`, textContent: loaded ? "loaded" : "not loaded" })),
        el("td", { textContent: Array.isArray(servedBy) ? servedBy.join(", ") : String(servedBy) }),
        el("td", { class: "wide path", textContent: files.get(m.id) || "" }));
    });
    $("#models tbody").replaceChildren(...rows);
    message.textContent = models.length ? "" : "The router serves no model yet.";
  } catch (error) {
    message.textContent = error.message;
  }
}

// The model files, and pulls with progress, where the daemon has the models API (/api/models).
async function loadFiles() {
  let files;
  try {
    files = await api.json("GET", "/api/models");
  } catch (error) {
    $("#model-files").hidden = true; // an older daemon without /api/models: the router's list below still shows
    return;
  }
  $("#model-files").hidden = false;
  const rows = files.map((f) => el("tr", {},
    el("th", { scope: "row", title: f.path, textContent: f.file + (f.exists ? "" : " (missing)") }),
    el("td", { class: "wide", textContent: f.architecture ?? "-" }),
    el("td", { class: "wide", textContent: f.parameters ?? "-" }),
    el("td", { textContent: f.quantization ?? "-" }),
    el("td", { class: "wide num", textContent: fmt.bytes(f.size_bytes) }),
    el("td", { textContent: (f.used_by || []).join(", ") || "-" }),
    el("td", { class: "wide", textContent: f.reference ?? "" })));
  $("#files tbody").replaceChildren(...rows);
}

$("#pull-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const reference = $("#pull-ref").value.trim();
  const progress = $("#pull-progress");
  const message = $("#pull-msg");
  const bars = new Map();
  progress.replaceChildren();
  message.className = "";
  message.textContent = `pulling ${reference}…`;
  $("#pull-send").disabled = true;
  const bar = (name, total) => {
    if (!bars.has(name)) {
      const meter = el("progress", { max: total || 1, value: 0, "aria-label": `download of ${name}` });
      const label = el("span", { class: "dim" });
      progress.append(el("div", { class: "row" }, el("code", { textContent: name }), meter, label));
      bars.set(name, { meter, label });
    }
    return bars.get(name);
  };
  try {
    const response = await api.fetch("POST", "/api/models/pull", { body: { reference } });
    for await (const item of parseLines(response.body)) {
      if (item.event === "plan") for (const f of item.files) bar(f.name, f.size);
      else if (item.event === "progress") {
        const { meter, label } = bar(item.file, item.total);
        if (item.total) meter.max = item.total;
        meter.value = item.done;
        label.textContent = `${fmt.bytes(item.done)} of ${fmt.bytes(item.total)}`;
      } else if (item.event === "done") {
        message.textContent = `pulled ${item.reference || reference}: ${item.path || ""}`;
      } else if (item.event === "error") {
        throw new Error(item.message);
      }
    }
    loadFiles();
  } catch (error) {
    message.className = "error";
    message.textContent = `pull failed: ${error.message}`;
  } finally {
    $("#pull-send").disabled = false;
  }
});

// -- playground ----------------------------------------------------------------------------------------------

$("#router-key").value = api.routerKey;
$("#router-key").addEventListener("change", (e) => api.setRouterKey(e.target.value.trim()));

async function loadChatModels() {
  const select = $("#chat-model");
  const chosen = select.value;
  try {
    const models = await routerModels();
    select.replaceChildren(...models.map((m) => el("option", { value: m.id, textContent: m.id })));
    if (models.some((m) => m.id === chosen)) select.value = chosen;
    $("#chat-error").textContent = "";
  } catch (error) {
    $("#chat-error").textContent = error.message;
  }
}

$("#chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.chatAbort?.abort();
  const abort = (state.chatAbort = new AbortController());
  const output = $("#chat-output");
  const stats = $("#chat-stats");
  output.textContent = "";
  output.dataset.state = "streaming";
  $("#chat-error").textContent = "";
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  const body = {
    model: $("#chat-model").value,
    messages: [{ role: "user", content: $("#chat-prompt").value }],
    max_tokens: Number($("#chat-max").value) || 64,
    stream: true,
  };
  try {
    for await (const message of api.events("POST", "/v1/chat/completions", { body, router: true, signal: abort.signal })) {
      if (message.data === "[DONE]") break;
      const chunk = JSON.parse(message.data);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) {
        first ??= performance.now();
        chunks += 1;
        output.textContent += text;
        output.dataset.chunks = String(chunks);
        const seconds = (performance.now() - first) / 1000;
        stats.textContent = `${chunks} tokens, first after ${Math.round(first - started)} ms` +
          (seconds > 0 ? `, ${(chunks / seconds).toFixed(1)} tok/s` : "");
      }
    }
    output.dataset.state = "done";
  } catch (error) {
    output.dataset.state = abort.signal.aborted ? "stopped" : "failed";
    if (!abort.signal.aborted) $("#chat-error").textContent = error.message;
  } finally {
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
  }
});

$("#chat-stop").addEventListener("click", () => state.chatAbort?.abort());

window.addEventListener("hashchange", () => show(location.hash.slice(1)));

open();

