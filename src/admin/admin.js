// A station's audit page: its decisions (filterable), the hash chain's verdict, and the
// privacy budget each researcher has spent. Read-only; every call carries the admin token
// in the cookie the sign-in page set.

const $ = (id) => document.getElementById(id);

async function api(path) {
  const response = await fetch(path);
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("not signed in");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function table(label, headers, rows) {
  const head = element("tr", {}, ...headers.map((h) => element("th", { scope: "col" }, h)));
  const body = element("tbody");
  for (const row of rows) {
    body.append(element("tr", {}, ...row.map((cell) => cell instanceof Node
      ? element("td", {}, cell)
      : element("td", typeof cell === "number" ? { className: "number" } : {}, cell ?? ""))));
  }
  return element("table", { "aria-label": label }, element("thead", {}, head), body);
}

async function verify() {
  try {
    const v = await api("/api/verify");
    const box = $("verify");
    if (v.intact) {
      box.className = "online";
      box.textContent = `Intact: ${v.records} record${v.records === 1 ? "" : "s"}, hash chain holds`
        + (v.head ? ` (head ${v.head.slice(0, 16)}…)` : "")
        + (v.torn_tail ? "; the last line was cut short by a crash and is not a record" : "");
    } else {
      box.className = "offline";
      box.textContent = `BROKEN at line ${v.broken.line}: ${v.broken.why} (${v.records} good records before it)`;
    }
  } catch (error) {
    $("verify").textContent = `Cannot check the audit log: ${error.message}`;
  }
}

async function spending() {
  try {
    const s = await api("/api/spending");
    const box = $("spending");
    box.replaceChildren();
    if (s.budget === null) {
      box.append(element("p", { className: "meta" }, "This station answers no differentially private aggregates."));
      return;
    }
    if (!s.accounts.length) {
      box.append(element("p", { className: "meta" }, `Nothing spent yet (budget ε ${s.budget} per researcher, collaboration and table).`));
      return;
    }
    box.append(table("Budget spent", ["researcher", "collaboration", "table", "ε spent", "of budget", "charges"],
      s.accounts.map((a) => [a.researcher, a.collaboration, a.table, a.spent, s.budget, a.charges])));
  } catch (error) {
    $("spending").textContent = `Cannot read the ledger: ${error.message}`;
  }
}

async function decisions() {
  const params = new URLSearchParams();
  for (const name of ["researcher", "decision", "rule", "sql"]) {
    const value = $(`f-${name}`).value.trim();
    if (value) params.set(name, value);
  }
  try {
    const a = await api(`/api/audit?${params}`);
    $("station").textContent = a.station;
    $("matched").textContent = `${a.matched} matching decision${a.matched === 1 ? "" : "s"}`
      + (a.matched > a.records.length ? `; the newest ${a.records.length} shown` : "");
    const rows = a.records.map((r) => [
      r.seq, r.time, r.researcher, r.query_id.slice(0, 8),
      element("span", { className: r.decision === "allowed" ? "online" : "offline" }, r.decision),
      r.rule ?? "", element("code", {}, r.train ? `train ${r.train}: ${r.sql}` : r.sql),
      r.rows, r.suppressed, r.epsilon ?? "",
    ]);
    $("decisions").replaceChildren(table("Decisions",
      ["#", "time", "researcher", "query", "decision", "rule", "fragment", "rows", "withheld", "ε"], rows));
  } catch (error) {
    $("decisions").textContent = `Cannot read the audit log: ${error.message}`;
  }
}

$("filters").addEventListener("submit", (event) => { event.preventDefault(); decisions(); });
$("logout").addEventListener("click", async () => {
  await fetch("/api/logout", { method: "POST" });
  window.location.assign("/login");
});
verify();
spending();
decisions();
