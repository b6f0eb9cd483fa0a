// The console's SQL editor: a textarea with its text drawn again, highlighted, underneath
// (the textarea's own text is transparent; its caret and selection stay native), and a
// completion list of the catalog's tables and columns, SQL keywords and Railyard's
// functions. Keyboard: Ctrl+Space opens the list, ↑/↓ move, Tab or Enter accepts, Escape
// closes; Ctrl+Enter runs.

const KEYWORDS = [
  "SELECT", "FROM", "WHERE", "GROUP", "BY", "ORDER", "HAVING", "LIMIT", "OFFSET", "JOIN",
  "LEFT", "RIGHT", "INNER", "OUTER", "FULL", "CROSS", "ON", "USING", "AS", "AND", "OR", "NOT",
  "IN", "IS", "NULL", "LIKE", "ILIKE", "BETWEEN", "CASE", "WHEN", "THEN", "ELSE", "END",
  "DISTINCT", "UNION", "ALL", "INTERSECT", "EXCEPT", "WITH", "ASC", "DESC", "NULLS", "FIRST",
  "LAST", "EXPLAIN", "FEDERATED", "CAST", "TRUE", "FALSE", "OVER", "PARTITION", "FILTER",
  "EXISTS", "VALUES", "INTERVAL", "DATE", "TIMESTAMP",
];
const FUNCTIONS = [
  "count", "sum", "avg", "min", "max", "stddev", "variance", "median", "coalesce", "round",
  "abs", "date_part", "extract", "dp_count", "dp_sum", "dp_avg", "dp_median", "dp_quantile",
  "kaplan_meier", "logrank", "glm", "glm_fit", "glm_terms", "cox", "cox_fit", "crosstab",
  "train",
];
const KEYWORD_SET = new Set(KEYWORDS);

let tables = new Set();
let columns = new Set();

/** Takes the catalog's table and column names for highlighting and completion. */
export function setCatalog(catalog) {
  tables = new Set();
  columns = new Set();
  for (const table of catalog.tables) {
    tables.add(table.name.toLowerCase());
    for (const column of table.columns) columns.add(column.name.toLowerCase());
  }
}

const TOKEN = /(--[^\n]*)|('(?:[^']|'')*'?)|("(?:[^"]|"")*"?)|(\b\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b)|([A-Za-z_][A-Za-z0-9_]*)|(\s+)|([^\sA-Za-z0-9_'"-]+|-)/g;

/** The class a token is drawn with, or null for plain text. */
function classOf(match, text, end) {
  const [, comment, string, quoted, number, word] = match;
  if (comment) return "comment";
  if (string) return "string";
  if (quoted) return "identifier";
  if (number) return "number";
  if (word) {
    const lower = word.toLowerCase();
    if (KEYWORD_SET.has(word.toUpperCase())) return "keyword";
    if (/^\s*\(/.test(text.slice(end))) return "function";
    if (tables.has(lower)) return "table";
    if (columns.has(lower)) return "column";
  }
  return null;
}

/** Draws `text` into `target` as highlighted spans (text nodes only: nothing is parsed as HTML). */
export function highlight(text, target) {
  const nodes = [];
  TOKEN.lastIndex = 0;
  let match;
  let at = 0;
  while ((match = TOKEN.exec(text)) !== null) {
    if (match.index > at) nodes.push(document.createTextNode(text.slice(at, match.index)));
    const end = match.index + match[0].length;
    const kind = classOf(match, text, end);
    if (kind) {
      const span = document.createElement("span");
      span.className = `tok-${kind}`;
      span.textContent = match[0];
      nodes.push(span);
    } else {
      nodes.push(document.createTextNode(match[0]));
    }
    at = end;
    if (match[0].length === 0) TOKEN.lastIndex += 1;
  }
  if (at < text.length) nodes.push(document.createTextNode(text.slice(at)));
  // A trailing newline needs a character after it to take up its line.
  nodes.push(document.createTextNode("\n"));
  target.replaceChildren(...nodes);
}

/** The word being typed before the caret, and where it starts. */
function wordBefore(textarea) {
  const upTo = textarea.value.slice(0, textarea.selectionStart);
  const m = /[A-Za-z_][A-Za-z0-9_]*$/.exec(upTo);
  return m ? { word: m[0], start: m.index } : { word: "", start: textarea.selectionStart };
}

/** Candidates for `prefix`: tables, columns, functions, then keywords. */
export function candidates(prefix) {
  const p = prefix.toLowerCase();
  const out = [];
  const add = (word, kind) => {
    if (word.toLowerCase().startsWith(p) && word.toLowerCase() !== p && !out.some((c) => c.word === word)) {
      out.push({ word, kind });
    }
  };
  for (const t of [...tables].sort()) add(t, "table");
  for (const c of [...columns].sort()) add(c, "column");
  for (const f of FUNCTIONS) add(f, "function");
  for (const k of KEYWORDS) add(k, "keyword");
  return out.slice(0, 12);
}

/** Makes `textarea` an editor, drawing into `layer` and completing into `list`. */
export function editor(textarea, layer, list, run) {
  let items = [];
  let active = -1;
  const redraw = () => {
    highlight(textarea.value, layer);
    layer.scrollTop = textarea.scrollTop;
    layer.scrollLeft = textarea.scrollLeft;
  };
  const close = () => {
    list.hidden = true;
    list.replaceChildren();
    items = [];
    active = -1;
    textarea.setAttribute("aria-expanded", "false");
    textarea.removeAttribute("aria-activedescendant");
  };
  const mark = (i) => {
    active = i;
    [...list.children].forEach((li, j) => li.setAttribute("aria-selected", String(j === i)));
    if (i >= 0) textarea.setAttribute("aria-activedescendant", `completion-${i}`);
  };
  const accept = (i) => {
    const { start } = wordBefore(textarea);
    const end = textarea.selectionStart;
    const word = items[i].word;
    textarea.setRangeText(word, start, end, "end");
    close();
    redraw();
    textarea.focus();
  };
  const open = (explicit) => {
    const { word } = wordBefore(textarea);
    if (!word && !explicit) return close();
    items = candidates(word);
    if (!items.length) return close();
    list.replaceChildren(...items.map((item, i) => {
      const li = document.createElement("li");
      li.id = `completion-${i}`;
      li.setAttribute("role", "option");
      li.className = `tok-${item.kind}`;
      li.textContent = item.word;
      const kind = document.createElement("span");
      kind.className = "meta";
      kind.textContent = ` ${item.kind}`;
      li.append(kind);
      // mousedown, not click: the textarea keeps its focus and caret.
      li.addEventListener("mousedown", (event) => { event.preventDefault(); accept(i); });
      return li;
    }));
    list.hidden = false;
    textarea.setAttribute("aria-expanded", "true");
    mark(0);
  };
  textarea.addEventListener("input", (event) => {
    redraw();
    if (event.inputType && event.inputType.startsWith("insert")) open(false);
    else close();
  });
  textarea.addEventListener("scroll", redraw);
  // Closed when the focus has left for good (a click elsewhere), not when it only blinked
  // away and back.
  textarea.addEventListener("blur", () => setTimeout(() => { if (document.activeElement !== textarea) close(); }, 100));
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      close();
      run();
      return;
    }
    if (event.key === " " && event.ctrlKey) {
      event.preventDefault();
      open(true);
      return;
    }
    if (list.hidden) return;
    if (event.key === "ArrowDown") { event.preventDefault(); mark((active + 1) % items.length); }
    else if (event.key === "ArrowUp") { event.preventDefault(); mark((active - 1 + items.length) % items.length); }
    else if (event.key === "Tab" || event.key === "Enter") { event.preventDefault(); accept(Math.max(active, 0)); }
    else if (event.key === "Escape") { event.preventDefault(); close(); }
  });
  // Other code (the history) sets the value directly.
  textarea.addEventListener("change", redraw);
  redraw();
  return { redraw };
}
