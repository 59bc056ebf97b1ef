"use strict";
// lessor's dashboard. Everyone sees the status, polled once a second from the public API. Given
// the admin token (kept in this tab's sessionStorage, sent only as a bearer header, never in a
// URL), it also follows the event stream, loads and unloads, and shows engine logs. Text from the
// API is only ever set as textContent.

const API = "/admin/v1";
const KINDS = ["weights", "kv", "load_peak", "reserve"];
const TOKEN_KEY = "lessor.admin-token";
// Models' colours: Tableau 10 with its red swapped for a gold, since red on this page means something is wrong.
const PALETTE = ["#4c78a8", "#f58518", "#54a24b", "#b279a2", "#b6992d", "#72b7b2", "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac"];
const POLL_MS = 1000, HISTORY_MS = 10000, FINGERPRINTS_MS = 10000, MAX_EVENTS = 200, RECONNECT_MS = 1000;

const page = {
  token: null, signedIn: false, status: null, fingerprints: [], history: null, colours: new Map(),
  stream: null, follower: 0, rows: new Map(), refreshing: false, again: false,
};

// -- small helpers ---------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "on") for (const [type, fn] of Object.entries(value)) node.addEventListener(type, fn);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

// The CLI's format_bytes: 1.0 GiB, 512.0 MiB, 70272 B.
function fmt(n) {
  const sign = n < 0 ? "-" : "";
  n = Math.abs(n);
  for (const [unit, size] of [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (n >= size) return `${sign}${(n / size).toFixed(1)} ${unit}`;
  }
  return `${sign}${n} B`;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(`${status} ${error.type || "error"}: ${error.message || JSON.stringify(body)}`);
    this.status = status;
  }
}

function bearer() {
  return {Authorization: `Bearer ${page.token}`};
}

// `auth`: the call needs the token (load, unload, log). Nothing else carries it.
async function call(method, path, {body, auth} = {}) {
  const init = {method, credentials: "omit", cache: "no-store", headers: auth ? bearer() : {}};
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(API + path, init);
  const text = await response.text();
  const type = response.headers.get("Content-Type") || "";
  const data = type.startsWith("application/json") && text ? JSON.parse(text) : text;
  if (!response.ok) {
    if (response.status === 401 && auth) signOut("the token was refused: sign in again");
    throw new ApiError(response.status, data);
  }
  return data;
}

function colour(model) {
  if (!page.colours.has(model)) page.colours.set(model, PALETTE[page.colours.size % PALETTE.length]);
  return page.colours.get(model);
}

// -- devices: the same segments as `lessor status`'s bar ----------------------------------------

// How every piece of memory is drawn, in the bars, their legends and the chart's key alike: the
// classes of dashboard.css's `.seg` rules, plus the model's colour as the --model variable. Nothing
// else sets a colour, so a swatch cannot differ from what it explains.
function paint(node, seg) {
  node.classList.add("seg", ...seg.cls.split(" "));
  if (seg.model) node.style.setProperty("--model", colour(seg.model));
  return node;
}

function swatch(seg) {
  return paint(el("span", {className: "swatch", data: {swatch: seg.label}}), seg);
}

function modelSeg(model, kind = "weights") {
  return {cls: `model kind-${kind}`, label: `${model} ${kind}`, model};
}

function segments(device) {
  const out = [{cls: "foreign", bytes: device.foreign_bytes, label: "foreign"},
               {cls: "headroom", bytes: device.headroom_bytes, label: "headroom"}];
  for (const [model, kinds] of Object.entries(device.models)) {
    for (const kind of KINDS) {
      if (kinds[kind]) out.push({...modelSeg(model, kind), bytes: kinds[kind]});
    }
  }
  return out;
}

function renderBar(device) {
  const capacity = Math.max(device.capacity_bytes, 1);
  const bar = el("div", {className: "bar"});
  let used = 0;
  for (const seg of segments(device)) {
    const share = Math.min(seg.bytes / capacity * 100, 100 - used);
    if (share <= 0) continue;
    used += share;
    const node = paint(el("div", {title: `${seg.label}: ${fmt(seg.bytes)}`, data: {segment: seg.label}}), seg);
    node.style.width = `${share}%`;
    bar.append(node);
  }
  return bar;
}

function number(field, label, bytes) {
  return el("span", {}, el("span", {className: "label", text: label}),
            el("span", {className: "value", text: fmt(bytes), data: {field, bytes: String(bytes)}}));
}

function renderDevice(device) {
  const title = `${device.id}  ${device.name}`;
  const numbers = el("div", {className: "numbers"},
    number("total", "total", device.total_bytes),
    device.capacity_bytes !== device.total_bytes ? number("capacity", "capacity", device.capacity_bytes) : null,
    number("foreign", "foreign", device.foreign_bytes),
    number("headroom", "headroom", device.headroom_bytes),
    number("leased", "leased", device.leased_bytes),
    number("leasable", "leasable", device.leasable_bytes),
    number("free", "free", device.free_bytes));
  // One entry per model segment of the bar, drawn by the same painter (foreign and headroom: the legend below).
  const holders = segments(device).filter((seg) => seg.model && seg.bytes).map((seg) =>
    el("span", {}, swatch(seg), seg.label, el("span", {className: "muted", text: ` ${fmt(seg.bytes)}`})));
  return el("div", {className: "device", data: {device: device.id}},
    el("div", {className: "title", text: title}), renderBar(device), numbers,
    holders.length ? el("div", {className: "legend"}, ...holders) : null);
}

const COMMON_SEGMENTS = [
  [{cls: "foreign", label: "foreign"}, "foreign: not lessor's"],
  [{cls: "headroom", label: "headroom"}, "headroom: kept free, never leased"],
  [{cls: "free", label: "free"}, "free"],
];

function renderLegend() {
  const items = COMMON_SEGMENTS.map(([seg, text]) => el("span", {}, swatch(seg), text));
  items.push(el("span", {text: "a model in its colour: weights solid, kv lighter, load_peak striped, reserve dotted"}));
  document.getElementById("legend").replaceChildren(...items);
}

// -- models ------------------------------------------------------------------------------------

function numbersFrom(model) {
  const used = page.fingerprints.find((f) => f.model === model.name && f.applies);
  if (used) return `measured (${used.loads} load${used.loads === 1 ? "" : "s"}, ${used.outcome})`;
  return "memory model";
}

function leasesText(model) {
  const parts = KINDS.filter((k) => model.leased_bytes[k]).map((k) => `${k} ${fmt(model.leased_bytes[k])}`);
  return parts.length ? parts.join(", ") : "none";
}

// 75 -> "1 min 15 s": for idle time and countdowns, read at a glance.
function duration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor(s % 86400 / 3600)} h`;
}

const NONE = "–";  // nothing to say, or a lessord that does not report it

function idleText(model) {
  return typeof model.idle_s === "number" ? duration(model.idle_s) : NONE;
}

function inFlightText(model) {
  return typeof model.in_flight === "number" ? String(model.in_flight) : NONE;
}

// keep_alive_ends_in_s: when lessord unloads it if no request comes; null where nothing counts down
// (not serving, pinned, keep_alive_s -1: never). Absent from a lessord that does not report it.
function keepAliveText(model) {
  const ends = model.keep_alive_ends_in_s;
  if (typeof ends === "number") return `in ${duration(ends)}`;
  if (ends !== null || model.state !== "ready") return NONE;
  if (model.pinned) return "pinned";
  return model.keep_alive_s < 0 ? "never" : NONE;
}

// waiting: {reason, recheck_in_s, blockers, requests} while its requests wait for room; else null or absent.
function waitingCell(model) {
  const w = model.waiting;
  if (!w) return [NONE];
  const details = [];
  if (typeof w.requests === "number") details.push(`${w.requests} request${w.requests === 1 ? "" : "s"}`);
  const blockers = w.blockers || [];
  if (blockers.length) details.push(`until ${blockers.join(", ")} finish${blockers.length === 1 ? "es" : ""}`);
  if (typeof w.recheck_in_s === "number") details.push(`weighed again in ${duration(w.recheck_in_s)}`);
  const reason = el("span", {text: w.reason || "waiting", data: {field: "waiting-reason"}});
  if (!details.length) return [reason];
  return [reason, el("div", {className: "muted", text: details.join(" · "), data: {field: "waiting-details"}})];
}

// What changes from one poll to the next without the row changing shape: set in place each poll,
// so a row (and the button under the pointer) is not rebuilt every second.
const TICKING = ["idle_s", "in_flight", "keep_alive_ends_in_s", "waiting", "request_rate", "started_share", "starved_s"];

function fillTicking(row, model) {
  const cell = (name) => row.querySelector(`[data-field="${name}"]`);
  cell("idle").textContent = idleText(model);
  cell("in-flight").textContent = inFlightText(model);
  cell("keep-alive").textContent = keepAliveText(model);
  cell("keep-alive").title = typeof model.keep_alive_s === "number"
    ? `keep_alive: ${model.keep_alive_s < 0 ? "never unloads" : duration(model.keep_alive_s)} (configured)` : "";
  cell("waiting").replaceChildren(...waitingCell(model));
}

function overrunText(model) {
  const o = model.overrun;
  return o ? `over its leases on ${o.device}: uses ${fmt(o.used_bytes)}, leased ${fmt(o.leased_bytes)}` : null;
}

function actionButton(label, fn) {
  return el("button", {type: "button", text: label, data: {action: label}, on: {click: fn}});
}

function renderRow(model) {
  const busy = model.state === "loading" || model.state === "unloading" || model.state === "adopting";
  const actions = [actionButton("plan", () => showPlan(model.name))];
  if (page.signedIn) {
    if (model.state === "ready") actions.push(actionButton("unload", () => act(model.name, "unload")));
    else if (!busy) actions.push(actionButton("load", () => act(model.name, "load")));
    actions.push(actionButton("log", () => showLog(model.name)));
  }
  const overrun = overrunText(model);
  const name = el("td", {}, el("span", {className: "name"}, swatch(modelSeg(model.name)), el("strong", {text: model.name}),
    model.aliases.length ? el("span", {className: "muted", text: ` (${model.aliases.join(", ")})`}) : null),
    model.error ? el("div", {className: "error", text: model.error}) : null,
    overrun ? el("div", {className: "error", text: overrun, data: {field: "overrun"}}) : null);
  const row = el("tr", {data: {model: model.name, state: model.state}}, name,
    el("td", {}, el("span", {className: "state", text: model.state, data: {field: "state", state: model.state}})),
    el("td", {data: {field: "waiting"}}),
    el("td", {className: "num", data: {field: "idle"}}),
    el("td", {className: "num", data: {field: "in-flight"}}),
    el("td", {className: "num", data: {field: "keep-alive"}}),
    el("td", {text: model.engine}),
    el("td", {text: model.devices.join(", ")}),
    el("td", {text: leasesText(model), data: {field: "leases"}}),
    el("td", {text: numbersFrom(model), data: {field: "numbers"}}),
    el("td", {className: "actions"}, ...actions));
  return row;
}

function renderModels(models) {
  const body = document.querySelector("#models tbody");
  const rows = models.map((m) => {
    const shape = Object.fromEntries(Object.entries(m).filter(([k]) => !TICKING.includes(k)));
    const key = JSON.stringify([shape, page.signedIn, numbersFrom(m)]);
    const cached = page.rows.get(m.name);
    const row = cached && cached.key === key ? cached.row : renderRow(m);
    page.rows.set(m.name, {key, row});
    fillTicking(row, m);
    return row;
  });
  body.replaceChildren(...rows);
}

async function act(name, action) {
  const note = document.getElementById("action-error");
  note.textContent = "";
  try {
    await call("POST", `/models/${encodeURIComponent(name)}`, {body: {action}, auth: true});
  } catch (error) {
    note.textContent = `${action} ${name}: ${error.message}`;
  }
  refresh();
}

function showDetail(title, ...content) {
  page.detail = title;
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-title").textContent = title;
  document.getElementById("detail-body").replaceChildren(
    ...content, el("button", {type: "button", text: "close", on: {click: closeDetail}}));
}

function closeDetail() {
  page.detail = null;
  document.getElementById("detail").hidden = true;
}

async function showLog(name) {
  try {
    const text = await call("GET", `/models/${encodeURIComponent(name)}/log?lines=200`, {auth: true});
    showDetail(`log: ${name}`, el("pre", {className: "log", text: text || "(empty)", data: {log: name}}));
  } catch (error) {
    showDetail(`log: ${name}`, el("p", {className: "error", text: error.message}));
  }
}

// The plan's memory components, each with its source (given, measured, formula, constant, estimate).
async function showPlan(name) {
  let plan;
  try {
    plan = await call("POST", "/plan", {body: {model: name}});
  } catch (error) {
    showDetail(`numbers: ${name}`, el("p", {className: "error", text: error.message}));
    return;
  }
  const used = plan.fingerprint && plan.fingerprint.used;
  const summary = el("p", {text: `${plan.fits ? "fits now" : "does not fit now"}; KV tokens ${plan.kv_tokens}; ` +
    (used ? `from the fingerprint of ${new Date(used.measured_at_s * 1000).toISOString()} (${used.loads} loads)`
          : "from the memory model (no fingerprint of this key yet)")});
  const rows = plan.memory.map((c) => el("tr", {data: {source: c.source}},
    el("td", {text: c.device}), el("td", {text: c.name}), el("td", {text: c.part}),
    el("td", {text: c.name === "kv_per_token" ? `${c.bytes} B/token` : fmt(c.bytes)}),
    el("td", {text: c.source}), el("td", {className: "muted", text: c.basis})));
  const table = el("table", {},
    el("thead", {}, el("tr", {}, ...["device", "component", "lease", "bytes", "source", "basis"].map((h) => el("th", {text: h})))),
    el("tbody", {}, ...rows));
  const reasons = plan.reasons.map((r) => el("p", {className: "error", text: r}));
  showDetail(`numbers: ${name}`, summary, ...reasons, table);
}

// -- usage history: a small SVG chart per device ---------------------------------------------------

const W = 900, H = 140, PAD_L = 48, PAD_B = 16, MIN_SPAN_S = 300;

function steps(points) {
  // x and y per sample, held until the next one (a lease is a step, not a slope).
  let d = "";
  points.forEach(([x, y], i) => { d += i === 0 ? `M${x},${y}` : `H${x}V${y}`; });
  return d;
}

function band(xs, lower, upper) {
  const top = steps(xs.map((x, i) => [x, upper[i]]));
  const back = xs.map((x, i) => [x, lower[i]]).reverse();
  let d = `${top}H${xs[xs.length - 1]}`;
  back.forEach(([x, y], i) => { d += i === 0 ? `V${y}` : `H${x}V${y}`; });
  return d + "Z";
}

function renderChart(id, samples, history) {
  const chart = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none",
                            "data-device": id, "data-samples": String(samples.length)});
  // The hour, or since the daemon's first sample when it is younger (at least five minutes).
  const now = history.now_s;
  const span = Math.min(history.window_s, Math.max(MIN_SPAN_S, samples.length ? now - samples[0].at_s : 0));
  const start = now - span;
  const top = Math.max(...samples.map((s) => s.capacity_bytes), 1);
  // Headroom hatched as in the bars (an SVG fill cannot take a CSS gradient); colours from the same variables.
  const hatch = `hatch-${id}`;
  const pattern = svg("pattern", {id: hatch, width: 6, height: 6, patternUnits: "userSpaceOnUse",
                                  patternTransform: "rotate(45)"});
  pattern.append(svg("rect", {class: "hatch-ground", width: 6, height: 6}), svg("rect", {class: "hatch-line", width: 1.5, height: 6}));
  const defs = svg("defs");
  defs.append(pattern);
  chart.append(defs);
  const x = (t) => PAD_L + (Math.max(t, start) - start) / span * (W - PAD_L);
  const y = (b) => (H - PAD_B) - b / top * (H - PAD_B - 4);
  for (const frac of [0, 0.5, 1]) {
    chart.append(svg("line", {class: "grid", x1: PAD_L, x2: W, y1: y(top * frac), y2: y(top * frac)}));
    chart.append(Object.assign(svg("text", {x: 2, y: y(top * frac) + 3}), {textContent: fmt(top * frac)}));
  }
  for (const quarter of [4, 3, 2, 1, 0]) {
    const ago_s = span * quarter / 4;
    const label = svg("text", {x: x(now - ago_s) - (quarter === 0 ? 18 : 8), y: H - 3});
    label.textContent = quarter ? `-${+(ago_s / 60).toFixed(ago_s < 600 ? 1 : 0)} min` : "now";
    chart.append(label);
  }
  if (samples.length) {
    const xs = [...samples.map((s) => x(s.at_s)), x(now)];
    const held = (f) => [...samples.map(f), f(samples[samples.length - 1])];
    const foreign = held((s) => s.foreign_bytes);
    const headroom = held((s) => s.foreign_bytes + s.headroom_bytes);
    const leased = held((s) => s.foreign_bytes + s.headroom_bytes + s.leased_bytes);
    const engines = held((s) => s.foreign_bytes + s.headroom_bytes + s.engines_bytes);
    const zero = xs.map(() => y(0));
    chart.append(svg("path", {class: "foreign", d: band(xs, zero, foreign.map(y))}));
    chart.append(svg("path", {class: "headroom", fill: `url(#${hatch})`, d: band(xs, foreign.map(y), headroom.map(y))}));
    chart.append(svg("path", {class: "leased", d: band(xs, headroom.map(y), leased.map(y))}));
    chart.append(svg("path", {class: "engines", d: steps(xs.map((px, i) => [px, y(engines[i])]))}));
  }
  const title = svg("title");
  title.textContent = `${id}: foreign (grey), headroom (hatched), leased (blue), engines' measured use (line), free above`;
  chart.append(title);
  return chart;
}

function renderHistory() {
  const history = page.history;
  if (!history) return;
  const ids = page.status ? page.status.devices.map((d) => d.id) : [];
  const charts = ids.map((id) => {
    const samples = history.samples.filter((s) => s.devices[id]).map((s) => ({at_s: s.at_s, ...s.devices[id]}));
    return el("div", {className: "device"}, el("div", {className: "title", text: id}), renderChart(id, samples, history));
  });
  const key = ["foreign", "headroom", "leased"].map((cls) => el("span", {}, swatch({cls, label: cls}), cls));
  key.push(el("span", {text: "line: what the engines measured · above: free · a sample every " +
                             `${history.interval_s} s and at each lease change · the last hour, or since lessord started`}));
  document.getElementById("history").replaceChildren(...charts, el("div", {className: "legend"}, ...key));
}

// -- events (signed in) -----------------------------------------------------------------------

function describe(event) {
  const skip = new Set(["type", "at_s"]);
  return Object.entries(event).filter(([k, v]) => !skip.has(k) && v !== "" && v !== null && !(Array.isArray(v) && !v.length))
    .map(([k, v]) => `${k}=${typeof v === "number" && k.endsWith("bytes") ? fmt(v) : Array.isArray(v) ? v.join(",") : v}`)
    .join(" ");
}

function onEvent(data) {
  let event;
  try { event = JSON.parse(data); } catch { return; }
  const when = new Date(event.at_s * 1000).toLocaleTimeString();
  const item = el("li", {data: {type: event.type, model: event.model || ""}},
    el("span", {className: "muted", text: when}), el("span", {className: "type", text: event.type}), describe(event));
  const list = document.getElementById("events");
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  refresh();  // the event's effect shows now, not at the next poll
  if (event.type.startsWith("lease") || event.type === "foreign_usage") loadHistory();
  if (event.type === "fingerprint_recorded") loadFingerprints();
}

function setLive(state, text) {
  const live = document.getElementById("live");
  live.dataset.state = state;
  live.textContent = text;
}

// Server-sent events over fetch, which can send the bearer header (EventSource cannot).
async function readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim());
      if (data.length) onEvent(data.join("\n"));  // comment lines (": keep-alive") carry none
    }
  }
}

// One connection at a time, again a second after it ends, until signed out. The first answer
// decides the sign-in: 200 signs in, 401 says the token is wrong.
async function follow() {
  const me = ++page.follower;  // a loop still waiting to reconnect after a sign-out ends, not doubles
  while (page.token && me === page.follower) {
    const stream = page.stream = new AbortController();
    try {
      const response = await fetch(API + "/events", {headers: bearer(), credentials: "omit", cache: "no-store",
                                                     signal: stream.signal});
      if (response.status === 401) {
        signOut(page.signedIn ? "the token was refused: sign in again" : "wrong token");
        return;
      }
      if (!response.ok) throw new ApiError(response.status, await response.text());
      if (!page.signedIn) setSignedIn(true);
      setLive("open", "live");
      refresh();  // whatever happened while the stream was away
      await readEvents(response.body);
    } catch (error) {
      if (stream.signal.aborted) return;
    }
    if (!page.token || me !== page.follower) return;
    setLive("closed", "reconnecting");
    await new Promise((done) => setTimeout(done, RECONNECT_MS));
  }
}

// -- signing in ------------------------------------------------------------------------------

function setSignedIn(on) {
  page.signedIn = on;
  document.body.dataset.signedIn = on ? "yes" : "no";
  document.getElementById("signin").hidden = on;
  document.getElementById("signed-in").hidden = !on;
  document.getElementById("events-note").hidden = on;
  if (!on) setLive("off", "polling");
  if (page.status) renderModels(page.status.models);
}

function signIn(event) {
  event.preventDefault();
  const field = document.getElementById("token");
  const token = field.value.trim();
  field.value = "";
  document.getElementById("signin-error").textContent = "";
  if (!token || page.token) return;
  page.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  follow();
}

function signOut(reason = "") {
  page.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (page.stream) page.stream.abort();
  page.stream = null;
  setSignedIn(false);
  document.getElementById("signin-error").textContent = reason;
}

// -- refresh loops ---------------------------------------------------------------------------

function showStatus(status) {
  page.status = status;
  document.getElementById("about").textContent = `${status.version} · probe ${status.probe} · policy ${status.policy}`;
  document.getElementById("devices").replaceChildren(...status.devices.map(renderDevice));
  renderLegend();
  renderModels(status.models);
  document.body.dataset.loaded = "yes";  // a status is drawn (the page's own first state, or a poll's)
}

async function refresh() {
  if (page.refreshing) { page.again = true; return; }
  page.refreshing = true;
  try {
    do {
      page.again = false;
      showStatus(await call("GET", "/status"));
      document.body.dataset.polled = "yes";  // the first poll answered: what a test waits for, not a timer
    } while (page.again);
  } catch (error) {
    document.getElementById("about").textContent = `cannot read the status: ${error.message}`;
  } finally {
    page.refreshing = false;
  }
}

async function loadHistory() {
  try {
    page.history = await call("GET", "/history");
    renderHistory();
  } catch (error) { /* the next round tries again; the status line says when the daemon is away */ }
}

async function loadFingerprints() {
  try {
    page.fingerprints = await call("GET", "/fingerprints");
    if (page.status) renderModels(page.status.models);
  } catch (error) { /* as above */ }
}

// The state lessord put in the page (dashboard.py), drawn before any poll: the first paint shows it.
function showFirstState() {
  let state;
  try { state = JSON.parse(document.getElementById("initial-state").textContent); } catch { return; }
  if (!state || !state.status) return;
  page.fingerprints = state.fingerprints || [];
  page.history = state.history || null;
  showStatus(state.status);
  renderHistory();
}

function start() {
  document.getElementById("signin").addEventListener("submit", signIn);
  document.getElementById("signout").addEventListener("click", () => signOut());
  setSignedIn(false);
  showFirstState();
  page.token = sessionStorage.getItem(TOKEN_KEY);  // a reload of a signed-in tab stays signed in
  if (page.token) follow();
  loadFingerprints();
  refresh().then(loadHistory);
  setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
  setInterval(() => { if (!document.hidden) loadHistory(); }, HISTORY_MS);
  setInterval(() => { if (!document.hidden) loadFingerprints(); }, FINGERPRINTS_MS);
}

start();
