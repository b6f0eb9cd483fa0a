// The Railyard console: talks to the hub's JSON API (docs/console.md) and draws what it
// answers. No framework and no build step: the hub embeds this file as it is.

import { editor, setCatalog } from "/editor.js";

const $ = (id) => document.getElementById(id);

/** Calls the API; resolves to its JSON, or throws an Error carrying the hub's message and rule. */
async function api(path, body) {
  const init = body === undefined
    ? { method: "GET" }
    : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (response.status === 401) {
    // A deployed console whose token is missing, expired or revoked: sign in again.
    window.location.assign("/login");
  }
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok) {
    const failure = type.includes("json") ? await response.json() : { error: await response.text() };
    const error = new Error(failure.error || response.statusText);
    error.rule = failure.rule;
    error.status = response.status;
    throw error;
  }
  return type.includes("json") ? response.json() : response.blob();
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A table of an answer's columns and rows; clicking (or Enter on) a header sorts by it. */
function answerTable(answer, caption, decorate = () => {}) {
  const table = element("table", { "aria-label": caption });
  const head = element("tr");
  const body = element("tbody");
  let order = { column: -1, ascending: true };
  const fill = () => {
    body.replaceChildren();
    const rows = answer.rows.slice();
    if (order.column >= 0) {
      const c = order.column;
      rows.sort((a, b) => {
        if (a[c] === b[c]) return 0;
        if (a[c] === null) return 1;
        if (b[c] === null) return -1;
        const less = typeof a[c] === "number" && typeof b[c] === "number" ? a[c] < b[c] : String(a[c]) < String(b[c]);
        return (less ? -1 : 1) * (order.ascending ? 1 : -1);
      });
    }
    for (const row of rows) {
      const tr = element("tr");
      row.forEach((value) => {
        if (value === null) tr.append(element("td", { className: "null" }, "NULL"));
        else tr.append(element("td", typeof value === "number" ? { className: "number" } : {}, value));
      });
      decorate(tr, row);
      body.append(tr);
    }
  };
  answer.columns.forEach((column, i) => {
    const th = element("th", { scope: "col", tabindex: "0", "aria-sort": "none", title: column.type }, column.name);
    const sort = () => {
      order = { column: i, ascending: order.column === i ? !order.ascending : true };
      for (const other of head.children) other.setAttribute("aria-sort", "none");
      th.setAttribute("aria-sort", order.ascending ? "ascending" : "descending");
      fill();
    };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); } });
    head.append(th);
  });
  table.append(element("thead", {}, head), body);
  fill();
  return table;
}

/** What an answer says it left out: groups below a station's k, or the hub's. */
function withheldText(withheld) {
  if (!withheld) return "";
  const parts = [];
  for (const [station, groups] of Object.entries(withheld.stations || {})) {
    if (groups) parts.push(`${station} ${groups}`);
  }
  if (withheld.hub) parts.push(`the hub ${withheld.hub}`);
  return parts.length ? `groups withheld below k: ${parts.join(", ")}` : "";
}

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#0b5cad", "#c2410c", "#15803d", "#7e22ce", "#a16207", "#be123c"];

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function ticks(lo, hi, count) {
  const step = (hi - lo) / count;
  return Array.from({ length: count + 1 }, (_, i) => lo + i * step);
}

/** lifelines' default band, the exponential Greenwood interval: with v = log S and
 * c = (se / S)², exp(−exp(log(−v) ∓ z·√c / v)). */
function greenwood(survival, se, z = 1.959963984540054) {
  if (se === null || survival <= 0 || survival >= 1) return [survival, survival];
  const v = Math.log(survival);
  const root = se / survival;
  return [Math.exp(-Math.exp(Math.log(-v) - (z * root) / v)), Math.exp(-Math.exp(Math.log(-v) + (z * root) / v))];
}

/** A Kaplan–Meier answer (time, survival, std_error, and group if any) as step curves
 * with their 95 % bands. */
function survivalChart(answer) {
  const names = answer.columns.map((c) => c.name);
  const col = (name) => names.indexOf(name);
  const [t, s, se, g, n] = [col("time"), col("survival"), col("std_error"), col("group"), col("at_risk")];
  const groups = new Map();
  for (const row of answer.rows) {
    const key = g >= 0 ? String(row[g]) : "all";
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(row);
  }
  // Below the axis: one row per group with the number at risk at each tick.
  const riskRows = n >= 0 ? groups.size : 0;
  const [width, left, right, top, bottom] = [720, 56, 130, 16, 44];
  const plotHeight = 340;
  const height = plotHeight + (riskRows ? 22 + riskRows * 16 : 0);
  const maxTime = Math.max(1, ...answer.rows.map((r) => r[t]));
  const x = (v) => left + (v / maxTime) * (width - left - right);
  const y = (v) => top + (1 - v) * (plotHeight - top - bottom);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "Kaplan–Meier survival curves with 95% confidence bands", class: "chart survival" });
  for (const v of ticks(0, 1, 4)) {
    chart.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2)));
  }
  for (const v of ticks(0, maxTime, 5)) {
    chart.append(svg("text", { x: x(v), y: plotHeight - bottom + 16, "text-anchor": "middle" }, Math.round(v)));
  }
  chart.append(svg("text", { x: (left + width - right) / 2, y: plotHeight - 6, "text-anchor": "middle" }, "time"));
  chart.append(svg("text", { x: 12, y: (top + plotHeight - bottom) / 2, transform: `rotate(-90 12 ${(top + plotHeight - bottom) / 2})`, "text-anchor": "middle" }, "survival"));
  if (riskRows) {
    chart.append(svg("text", { x: left, y: plotHeight + 10, class: "meta" }, "number at risk"));
  }
  [...groups.entries()].forEach(([key, rows], i) => {
    const color = PALETTE[i % PALETTE.length];
    rows.sort((a, b) => a[t] - b[t]);
    let curve = `M ${x(0)} ${y(1)}`;
    let upper = `M ${x(0)} ${y(1)}`;
    const lowerPoints = [[x(0), y(1)]];
    let [last, lastLo, lastHi] = [1, 1, 1];
    for (const row of rows) {
      const [lo, hi] = greenwood(row[s], se >= 0 ? row[se] : null);
      curve += ` H ${x(row[t])} V ${y(row[s])}`;
      upper += ` H ${x(row[t])} V ${y(hi)}`;
      lowerPoints.push([x(row[t]), y(lastLo)], [x(row[t]), y(lo)]);
      [last, lastLo, lastHi] = [row[s], lo, hi];
    }
    const end = x(rows.length ? rows[rows.length - 1][t] : 0);
    const band = upper + " " + lowerPoints.reverse().map(([px, py]) => `L ${px} ${py}`).join(" ") + " Z";
    chart.append(svg("path", { d: band, class: "band", fill: color, "fill-opacity": 0.15, stroke: "none" }));
    chart.append(svg("path", { d: curve + ` H ${end}`, class: "curve", fill: "none", stroke: color, "stroke-width": 2 },
      svg("title", {}, `${key}: last estimate ${last.toFixed(3)} (95% ${lastLo.toFixed(3)}–${lastHi.toFixed(3)})`)));
    chart.append(svg("text", { x: width - right + 10, y: top + 14 + i * 18, style: `fill: ${color}; font-weight: 600` }, g >= 0 ? `${names[g]} ${key}` : "all"));
    if (riskRows) {
      // At a tick, those at risk are those at risk at the first released time from it on
      // (none is released after the last time: shown as –).
      const rowY = plotHeight + 26 + i * 16;
      chart.append(svg("text", { x: 8, y: rowY, style: `fill: ${color}; font-weight: 600` }, g >= 0 ? key : "all"));
      for (const v of ticks(0, maxTime, 5)) {
        const next = rows.find((row) => row[t] >= v);
        chart.append(svg("text", { x: x(v), y: rowY, "text-anchor": "middle", class: "at-risk", style: `fill: ${color}` }, next ? next[n] : "–"));
      }
    }
  });
  return chart;
}

/** A model's coefficients (term, estimate, std_error) as a forest plot: each estimate
 * with its 95 % Wald interval, and the line of no effect. */
function forestPlot(answer) {
  const names = answer.columns.map((c) => c.name);
  const [term, est, se] = ["term", "estimate", "std_error"].map((n) => names.indexOf(n));
  const rows = answer.rows.map((r) => ({ term: r[term], estimate: r[est], lo: r[est] - 1.959963984540054 * r[se], hi: r[est] + 1.959963984540054 * r[se] }));
  const [width, left, right, rowHeight, top] = [720, 150, 24, 26, 16];
  const height = top + rows.length * rowHeight + 36;
  const lo = Math.min(0, ...rows.map((r) => r.lo));
  const hi = Math.max(0, ...rows.map((r) => r.hi));
  const x = (v) => left + ((v - lo) / (hi - lo || 1)) * (width - left - right);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "Coefficients with 95% confidence intervals", class: "chart forest" });
  chart.append(svg("line", { x1: x(0), x2: x(0), y1: top - 6, y2: top + rows.length * rowHeight, class: "zero" }));
  rows.forEach((r, i) => {
    const cy = top + i * rowHeight + rowHeight / 2;
    chart.append(svg("text", { x: left - 8, y: cy + 4, "text-anchor": "end" }, r.term));
    chart.append(svg("line", { x1: x(r.lo), x2: x(r.hi), y1: cy, y2: cy, class: "ci", stroke: PALETTE[0], "stroke-width": 2 }));
    chart.append(svg("circle", { cx: x(r.estimate), cy, r: 4, class: "estimate", fill: PALETTE[0] },
      svg("title", {}, `${r.term}: ${r.estimate.toPrecision(4)} (95% ${r.lo.toPrecision(4)} to ${r.hi.toPrecision(4)})`)));
  });
  for (const v of ticks(lo, hi, 4)) {
    chart.append(svg("text", { x: x(v), y: height - 10, "text-anchor": "middle" }, v.toPrecision(3)));
  }
  return chart;
}

/** The chart an answer's columns call for, if any. */
function chartFor(answer) {
  const names = new Set(answer.columns.map((c) => c.name));
  if (names.has("time") && names.has("survival") && answer.rows.length) return survivalChart(answer);
  if (names.has("term") && names.has("estimate") && names.has("std_error") && answer.rows.length) return forestPlot(answer);
  return null;
}

/** For a crosstab, a row decorator that marks suppressed cells (below a station's k). */
function suppressedCells(answer) {
  const names = answer.columns.map((c) => c.name);
  const [suppressed, count] = [names.indexOf("suppressed"), names.indexOf("count")];
  if (suppressed < 0 || count < 0) return () => {};
  return (tr, row) => {
    if (row[suppressed] === true) {
      const cell = tr.cells[count];
      cell.textContent = "suppressed";
      cell.className = "suppressed";
      cell.title = "fewer patients than a station's k: not released";
    }
  };
}

function showRefusal(error) {
  const box = $("refusal");
  box.replaceChildren();
  if (error.rule) box.append(element("span", { className: "rule" }, `Refused (rule ${error.rule}): `));
  box.append(error.message);
  box.hidden = false;
}

function clearOutput() {
  // The downloads are of the answer shown; none is shown until the next one arrives.
  $("download-csv").disabled = true;
  $("download-parquet").disabled = true;
  $("refusal").hidden = true;
  $("result").replaceChildren();
  $("status").textContent = "";
}

let lastSql = null;
let lastId = null;
let running = null;

async function run() {
  if (running) return;
  const sql = $("sql").value;
  clearOutput();
  $("status").textContent = "Running…";
  const started = performance.now();
  running = crypto.randomUUID();
  $("cancel").disabled = false;
  $("run").disabled = true;
  try {
    const answer = await api("/api/query", { sql, id: running });
    const ms = Math.round(performance.now() - started);
    const notes = [`${answer.row_count} row${answer.row_count === 1 ? "" : "s"} in ${ms} ms`];
    if (answer.truncated) notes.push(`showing the first ${answer.rows.length}`);
    if (answer.epsilon) notes.push(`ε charged: ${Object.entries(answer.epsilon).map(([s, e]) => `${s} ${e}`).join(", ")}`);
    const withheld = withheldText(answer.withheld);
    if (withheld) notes.push(withheld);
    $("status").textContent = notes.join(" · ");
    const chart = chartFor(answer);
    if (chart) $("result").append(chart);
    $("result").append(answerTable(answer, "Answer", suppressedCells(answer)));
    lastSql = sql;
    lastId = running;
    $("download-csv").disabled = false;
    $("download-parquet").disabled = false;
  } catch (error) {
    $("status").textContent = "";
    if (error.status === 409 && error.message.startsWith("cancelled")) $("status").textContent = "Cancelled.";
    else showRefusal(error);
  } finally {
    running = null;
    $("cancel").disabled = true;
    $("run").disabled = false;
  }
  loadHistory();
}

async function cancel() {
  if (!running) return;
  $("status").textContent = "Cancelling…";
  try {
    await api("/api/cancel", { id: running });
  } catch (error) {
    // It ended meanwhile: its answer or refusal is on its way.
    if (error.status !== 404) showRefusal(error);
  }
}

async function explain() {
  const sql = $("sql").value;
  clearOutput();
  $("status").textContent = "Planning…";
  try {
    const plan = await api("/api/explain", { sql });
    $("status").textContent = "What each station runs and releases, then the hub's merge:";
    const names = plan.columns.map((c) => c.name);
    const at = (row, name) => row[names.indexOf(name)];
    const list = element("div", { className: "plan" });
    for (const row of plan.rows) {
      const location = at(row, "location");
      const details = element("details", { open: "" },
        element("summary", {}, `${location}: ${at(row, "step") ?? ""}`),
        element("pre", { className: "fragment" }, at(row, "plan") ?? ""));
      const releases = at(row, "releases");
      if (releases) details.append(element("p", { className: "meta" }, `Leaves the station: ${releases}`));
      list.append(details);
    }
    $("result").append(list);
  } catch (error) {
    $("status").textContent = "";
    showRefusal(error);
  }
}

async function download(format) {
  if (lastSql === null) return;
  try {
    // The answer the hub kept for this page: nothing runs again, so a DP answer is not
    // charged twice. Once it is no longer kept, the query runs again.
    let blob;
    try {
      blob = await api(`/api/answer/${lastId}?format=${format}`);
    } catch (error) {
      if (error.status !== 404) throw error;
      blob = await api(`/api/query?format=${format}`, { sql: lastSql });
    }
    const url = URL.createObjectURL(blob);
    const link = element("a", { href: url, download: `railyard-answer.${format}` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (error) {
    showRefusal(error);
  }
}

async function refreshStations() {
  try {
    const stations = await api("/api/stations");
    $("stations").replaceWith(stationTable(stations));
    $("stations-checked").textContent = `checked ${new Date().toLocaleTimeString()}; refreshed every 5 s`;
  } catch (error) {
    $("stations").replaceWith(element("p", { id: "stations" }, `Stations unavailable: ${error.message}`));
  }
}

/** rows of a JSON answer as objects keyed by column name */
function records(answer) {
  const names = answer.columns.map((c) => c.name);
  return answer.rows.map((row) => Object.fromEntries(names.map((n, i) => [n, row[i]])));
}

/** "a 5, b 10", or "5" when every station says the same */
function perStation(map) {
  const values = new Set(Object.values(map).map(String));
  if (values.size === 1) return [...values][0];
  return Object.entries(map).map(([station, value]) => `${station} ${value}`).join(", ");
}

async function overview() {
  await refreshStations();
  let policies = [];
  let budget = [];
  try { policies = records(await api("/api/policies")); } catch { /* shown without policy */ }
  try { budget = records(await api("/api/budget")); } catch { /* shown without budget */ }
  try {
    const catalog = await api("/api/catalog");
    setCatalog(catalog);
    $("sql").dispatchEvent(new Event("change"));
    const box = $("tables");
    box.replaceChildren();
    for (const table of catalog.tables.filter((t) => t.schema === "public")) {
      const rules = policies.filter((p) => p.table_name === table.name);
      const k = {}, unit = {}, left = {};
      for (const p of rules) {
        k[p.station] = p.min_group_size;
        unit[p.station] = p.privacy_unit ?? "rows";
      }
      for (const b of budget.filter((b) => b.table_name === table.name)) left[b.station] = b.remaining;
      const columns = element("ul", { className: "columns-list" });
      for (const c of table.columns) {
        const seen = {};
        for (const p of rules.filter((p) => p.column_name === c.name)) seen[p.station] = p.visibility;
        columns.append(element("li", {}, element("code", {}, c.name), ` ${c.type}`,
          Object.keys(seen).length ? element("span", { className: "meta" }, ` — ${perStation(seen)}`) : ""));
      }
      const facts = [];
      if (Object.keys(k).length) facts.push(`k: ${perStation(k)}`, `privacy unit: ${perStation(unit)}`);
      if (Object.keys(left).length) facts.push(`DP budget left: ${perStation(left)}`);
      box.append(element("details", {},
        element("summary", {}, `${table.name} (${table.columns.length} columns)`),
        facts.length ? element("p", { className: "meta" }, facts.join(" · ")) : "",
        columns));
    }
  } catch (error) {
    $("tables").textContent = `Tables unavailable: ${error.message}`;
  }
}

async function session() {
  try {
    const me = await api("/api/session");
    if (me.authenticated) {
      $("who").textContent = `${me.researcher} · ${me.collaboration}`;
      $("session").hidden = false;
    }
  } catch { /* the page works without */ }
}

function stationTable(stations) {
  const names = stations.columns.map((c) => c.name);
  const wanted = ["station", "online", "last_seen", "tables"].filter((n) => names.includes(n));
  const answer = {
    columns: wanted.map((n) => stations.columns[names.indexOf(n)]),
    rows: stations.rows.map((row) => wanted.map((n) => row[names.indexOf(n)])),
  };
  const table = answerTable(answer, "Stations");
  table.id = "stations";
  const online = wanted.indexOf("online");
  if (online >= 0) {
    for (const tr of table.tBodies[0].rows) {
      const cell = tr.cells[online];
      const up = cell.textContent === "true";
      cell.className = up ? "online" : "offline";
      cell.textContent = up ? "online" : "offline";
    }
  }
  return table;
}

async function loadHistory() {
  try {
    const { entries } = await api("/api/history");
    const list = $("history");
    list.replaceChildren();
    for (const entry of entries) {
      const outcome = entry.outcome === "answered"
        ? `${entry.rows} row${entry.rows === 1 ? "" : "s"}`
        : `${entry.outcome}${entry.rule ? ` (rule ${entry.rule})` : ""}`;
      const button = element("button", { type: "button", className: "link" }, entry.sql);
      button.addEventListener("click", () => {
        $("sql").value = entry.sql;
        $("sql").dispatchEvent(new Event("change"));
        $("sql").focus();
      });
      list.append(element("li", { className: entry.outcome }, button, element("span", { className: "meta" }, ` ${entry.at} · ${outcome}`)));
    }
  } catch (error) {
    $("history").replaceChildren(element("li", {}, `History unavailable: ${error.message}`));
  }
}

$("run").addEventListener("click", run);
$("cancel").addEventListener("click", cancel);
$("explain").addEventListener("click", explain);
$("download-csv").addEventListener("click", () => download("csv"));
$("download-parquet").addEventListener("click", () => download("parquet"));
$("logout").addEventListener("click", async () => {
  await fetch("/api/logout", { method: "POST" });
  window.location.assign("/login");
});
editor($("sql"), $("highlight"), $("completions"), run);
session();
overview();
loadHistory();
setInterval(refreshStations, 5000);
