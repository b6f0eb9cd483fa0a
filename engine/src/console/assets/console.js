// The Railyard console: talks to the hub's JSON API (docs/console.md) and draws what it
// answers. No framework and no build step: the hub embeds this file as it is.

const $ = (id) => document.getElementById(id);

/** Calls the API; resolves to its JSON, or throws an Error carrying the hub's message and rule. */
async function api(path, body) {
  const init = body === undefined
    ? { method: "GET" }
    : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, init);
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
function answerTable(answer, caption) {
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

function showRefusal(error) {
  const box = $("refusal");
  box.replaceChildren();
  if (error.rule) box.append(element("span", { className: "rule" }, `Refused (rule ${error.rule}): `));
  box.append(error.message);
  box.hidden = false;
}

function clearOutput() {
  $("refusal").hidden = true;
  $("result").replaceChildren();
  $("status").textContent = "";
}

let lastSql = null;

async function run() {
  const sql = $("sql").value;
  clearOutput();
  $("status").textContent = "Running…";
  const started = performance.now();
  try {
    const answer = await api("/api/query", { sql });
    const ms = Math.round(performance.now() - started);
    const notes = [`${answer.row_count} row${answer.row_count === 1 ? "" : "s"} in ${ms} ms`];
    if (answer.truncated) notes.push(`showing the first ${answer.rows.length}`);
    if (answer.epsilon) notes.push(`ε charged: ${Object.entries(answer.epsilon).map(([s, e]) => `${s} ${e}`).join(", ")}`);
    const withheld = withheldText(answer.withheld);
    if (withheld) notes.push(withheld);
    $("status").textContent = notes.join(" · ");
    $("result").append(answerTable(answer, "Answer"));
    lastSql = sql;
    $("download-csv").disabled = false;
    $("download-parquet").disabled = false;
  } catch (error) {
    $("status").textContent = "";
    showRefusal(error);
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
    const blob = await api(`/api/query?format=${format}`, { sql: lastSql });
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

async function overview() {
  try {
    const stations = await api("/api/stations");
    $("stations").replaceWith(stationTable(stations));
  } catch (error) {
    $("stations").replaceWith(element("p", { id: "stations" }, `Stations unavailable: ${error.message}`));
  }
  try {
    const catalog = await api("/api/catalog");
    const box = $("tables");
    box.replaceChildren();
    for (const table of catalog.tables.filter((t) => t.schema === "public")) {
      box.append(element("details", {},
        element("summary", {}, `${table.name} (${table.columns.length} columns)`),
        element("p", { className: "meta" }, table.columns.map((c) => `${c.name} ${c.type}`).join(", "))));
    }
  } catch (error) {
    $("tables").textContent = `Tables unavailable: ${error.message}`;
  }
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

$("run").addEventListener("click", run);
$("explain").addEventListener("click", explain);
$("download-csv").addEventListener("click", () => download("csv"));
$("download-parquet").addEventListener("click", () => download("parquet"));
$("sql").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    run();
  }
});
overview();
