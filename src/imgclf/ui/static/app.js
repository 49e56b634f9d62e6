// imgclf review app: plain JS, no dependencies. Every list is paged by the server.
"use strict";

const PER_PAGE = 60;
const ALL_BARS = 8; // more classes: a card shows the TOP_BARS highest scores (and the true and predicted class)
const TOP_BARS = 5;
const ALL_BUTTONS = 12; // more classes: a card moves its image with a list and a Move button
const state = {
  tab: "browse", info: null, classes: [],
  browse: { label: null, page: 1 },
  results: { page: 1, outcome: "all", sort: "confidence_asc", true: "", pred: "" },
  suspects: { page: 1 }, unlabeled: { page: 1, current: 0, items: [] },
  analysis: null, zoomPath: null,
};

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};
const q = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null)).toString();

// The server stopped (or the network is down): a banner says so until a request gets an answer again.
class Unreachable extends Error {}
const UNREACHABLE = "the review server does not answer (stopped?): start imgclf ui again, then reload this page";

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  let r;
  try { r = await fetch(path, opts); } catch (e) {
    $("#offline").textContent = UNREACHABLE;
    $("#offline").hidden = false;
    throw new Unreachable(UNREACHABLE);
  }
  $("#offline").hidden = true;
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : `${r.status} ${r.statusText}`);
  return data;
}

// A message: news fades after 3.5 s; an error is an alert that stays until closed (×, Esc) or replaced.
let toastTimer = null;
function toast(msg, error = false) {
  const t = $("#toast");
  clearTimeout(toastTimer);
  if (error) {
    t.replaceChildren(el("span", { role: "alert" }, msg), el("button", { class: "close", "aria-label": "Close the message", onclick: hideToast }, "×"));
  } else {
    t.replaceChildren(msg);
    toastTimer = setTimeout(hideToast, 3500);
  }
  t.className = "show" + (error ? " error" : "");
}
function hideToast() { $("#toast").className = ""; $("#toast").replaceChildren(); }

// v: the server's version of the file (it changes when the file is replaced): in the URL, since a browser
// shows the picture it already holds for a URL, whatever the cache headers say.
const thumb = (path, v) => el("button", { class: "thumb", "aria-label": `Zoom ${path}`, onclick: (ev) => zoom(path, v, ev.currentTarget) },
  el("img", { src: `/api/thumb?${q({ path, size: 256, v: v ?? "" })}`, loading: "lazy", alt: path, onerror: (ev) => unshown(ev.target, path) }));

// Why an image cannot be shown: the server's reason (a small thumbnail it fails to make), else the browser's.
async function whyUnshown(path) {
  try {
    const r = await fetch(`/api/thumb?${q({ path, size: 64 })}`);
    if (!r.ok) return (await r.json().catch(() => ({}))).detail || `cannot show ${path}: ${r.status} ${r.statusText}`;
  } catch (e) { return `cannot show ${path}: ${e.message}`; }
  return `cannot show ${path}: this browser cannot decode the file`;
}

// A thumbnail that failed: a placeholder saying why, in its place (a click still opens the zoom and its buttons).
function unshown(img, path) {
  const box = el("span", { class: "unshown" }, "cannot show this image");
  img.replaceWith(box);
  whyUnshown(path).then((why) => { box.textContent = why; });
}

// A bar per class score: every class where they are few, else the highest ones (with the true and predicted
// class wherever they rank) and what the others hold together.
function bars(scores, classes, trueLabel, predLabel) {
  const box = el("div", { class: "bars" });
  let shown = classes.map((c, i) => i);
  if (classes.length > ALL_BARS) {
    const ranked = [...shown].sort((a, b) => scores[b] - scores[a]);
    shown = ranked.filter((i, r) => r < TOP_BARS || classes[i] === trueLabel || classes[i] === predLabel);
  }
  for (const i of shown) {
    const c = classes[i];
    const cls = ["bar", c === trueLabel ? "true" : "", c === predLabel ? "pred" : ""].join(" ").trim();
    const fill = el("div", { style: `width:${(100 * scores[i]).toFixed(1)}%` });
    box.append(el("span", { title: c }, c), el("div", { class: cls, title: scores[i].toFixed(3) }, fill), el("span", {}, scores[i].toFixed(2)));
  }
  if (shown.length < classes.length) {
    const rest = scores.reduce((sum, v, i) => (shown.includes(i) ? sum : sum + v), 0);
    const n = classes.length - shown.length;
    box.append(el("span", { class: "others" }, `${n} other class${n === 1 ? "" : "es"}: ${rest.toFixed(2)} together`));
  }
  return box;
}

// The ways to move an image to another class: a button a class where they are few, else the suggested class's
// button and a list of every class with a Move button.
function moveButtons(path, current, suggested, before = null) {
  const box = el("div", { class: "buttons" });
  const move = (c) => { if (before) before(); keepingFocus(() => relabel(path, c)); };
  const button = (c, i) => {
    const text = `${i < 9 ? i + 1 + " " : ""}${c}`;
    return el("button", { "data-label": c, title: `Move to ${c}`, "aria-label": `${text}: move ${path} to ${c}`, onclick: () => move(c) }, text);
  };
  const others = state.classes.map((c, i) => [c, i]).filter(([c]) => c !== current);
  if (state.classes.length <= ALL_BUTTONS) {
    for (const [c, i] of others) {
      const b = button(c, i);
      if (c === suggested) b.classList.add("suggested");
      box.append(b);
    }
    return box;
  }
  if (suggested && suggested !== current) box.append(Object.assign(button(suggested, state.classes.indexOf(suggested)), { className: "suggested" }));
  const list = el("select", { class: "move-to", "aria-label": `Class to move ${path} to` },
    el("option", { value: "" }, "move to…"), ...others.map(([c, i]) => el("option", { value: c }, `${i < 9 ? i + 1 + " " : ""}${c}`)));
  box.append(list, el("button", { class: "move", "aria-label": `Move ${path} to the class chosen`, onclick: () => { if (list.value) move(list.value); else list.focus(); } }, "Move"));
  return box;
}

function pager(name, data, go) {
  const box = document.querySelector(`.pager[data-for="${name}"]`);
  const pages = Math.max(1, Math.ceil(data.total / data.per_page));
  box.replaceChildren(
    el("button", { class: "prev", onclick: () => keepingFocus(() => go(data.page - 1)), ...(data.page <= 1 ? { disabled: "" } : {}) }, "‹ Prev"),
    el("span", { class: "page-info" }, `page ${data.page} / ${pages} · ${data.total} images`),
    el("button", { class: "next", onclick: () => keepingFocus(() => go(data.page + 1)), ...(data.page >= pages ? { disabled: "" } : {}) }, "Next ›"),
  );
}

// A list drawn anew drops the focused element: the focus goes back to it, else to the same button of the card
// now in its place (or that card's first button), else to the same button of its row (class list, pager),
// else to the tab shown.
function focusKey(a = document.activeElement) {
  if (!a || a === document.body) return null;
  const card = a.closest(".card");
  const row = a.closest(".pager, #class-list, #confusion");
  return {
    element: a,
    grid: card ? card.parentElement.id : null,
    index: card ? [...card.parentElement.children].indexOf(card) : -1,
    within: row ? (row.id ? `#${row.id}` : `.pager[data-for="${row.dataset.for}"]`) : null,
    selector: a.dataset.label !== undefined ? `button[data-label="${CSS.escape(a.dataset.label)}"]`
      : a.dataset.true !== undefined ? `button[data-true="${CSS.escape(a.dataset.true)}"][data-pred="${CSS.escape(a.dataset.pred)}"]`
      : a.classList.length ? `.${a.classList[0]}` : null,
  };
}

function restoreFocus(k) {
  if (!k || (document.activeElement && document.activeElement !== document.body)) return;
  const usable = (e) => e && e.isConnected && !e.disabled && e.offsetParent !== null;
  const pick = (box) => box && [...(k.selector ? box.querySelectorAll(k.selector) : []), ...box.querySelectorAll("button")].find(usable);
  let target = usable(k.element) ? k.element : null;
  if (!target && k.grid) {
    const cards = document.getElementById(k.grid).children;
    target = pick(cards[Math.min(k.index, cards.length - 1)]);
  }
  if (!target && k.within) target = pick(document.querySelector(k.within));
  (target || $("#tabs button.active")).focus(); // nothing alike left (a note's button): the tab shown
}

async function keepingFocus(action) {
  const k = focusKey();
  try { return await action(); } finally { restoreFocus(k); }
}

// After a failed request: the page may be out of date (another tab or request moved the image), so it is
// shown anew; the error stays in the toast.
async function refreshAfter(e) {
  if (e instanceof Unreachable) { toast(e.message, true); return; }
  toast(`${e.message}; the page is refreshed`, true);
  try { await refresh(); } catch (e2) { toast(`${e.message}; refreshing the page failed: ${e2.message}`, true); }
}

// Move an image to the class folder of label; true if it moved.
async function relabel(path, label) {
  let rec;
  try { rec = await api("/api/relabel", { path, label }); } catch (e) { await refreshAfter(e); return false; }
  toast(`moved ${rec.from} → ${rec.to}`);
  await refresh();
  return true;
}

const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const andMore = (shown, total) => (total > shown ? ` and ${total - shown} more` : "");

// An undo report in a few words: one move in full, several as a count and the first names.
function undoText(r) {
  const moves = r.undone;
  const undone = moves.length === 1 ? `undone: ${moves[0].to} → ${moves[0].from}`
    : moves.length ? `undone ${moves.length} moves, back in place: ${moves.slice(0, 3).map((m) => m.from).join(", ")}${andMore(3, moves.length)}` : "";
  const problems = r.problems.length ? `${r.problems[0]}${r.problems.length > 1 ? ` (and ${plural(r.problems.length - 1, "more problem")})` : ""}` : "";
  return [undone, problems].filter(Boolean).join("; ") || "nothing to undo";
}

// The undo buttons are off while an undo runs: a double click undid the move before the last one too. Undo
// last and Undo all name the last move they saw; the server refuses (409) if another one is last by then.
async function undo(all) {
  const buttons = [$("#undo-last"), $("#undo-all")];
  if (buttons.some((b) => b.disabled)) return;
  const k = focusKey();
  buttons.forEach((b) => { b.disabled = true; });
  try {
    const last = await api("/api/journal?per_page=1");
    if (!last.total) { toast("nothing to undo"); return; }
    if (all && !confirm(`Undo all ${plural(last.total, "move")}? Every relabelled image goes back where it was.`)) return;
    const r = await api("/api/undo", { all, id: last.items[0].id });  // all: not a move made after the confirm
    toast(undoText(r), r.problems.length > 0);
    await refresh();
  } catch (e) { await refreshAfter(e); } finally { buttons.forEach((b) => { b.disabled = false; }); restoreFocus(k); }
}

// The class of an image path: its first folder, or its second in a data folder laid out by split (train/ants/x.jpg),
// composed as the server names classes (a copy from macOS has decomposed folder names).
function labelOf(path) {
  const parts = path.split("/");
  return (state.info && state.info.splits.includes(parts[0]) && parts.length > 2 ? parts[1] : parts[0]).normalize("NFC");
}

const BEHIND_ZOOM = ["header", "#offline", "#status", "main"];

function zoom(path, v, opener = document.activeElement) {
  if ($("#zoom").hidden) state.zoomReturn = focusKey(opener);
  state.zoomPath = path;
  $("#zoom-error").hidden = true;
  $("#zoom-img").hidden = false;
  $("#zoom-img").src = `/api/image?${q({ path, v: v ?? "" })}`;
  $("#zoom-path").textContent = path;
  const current = labelOf(path);
  $("#zoom-labels").replaceChildren(moveButtons(path, current, null, closeZoom));
  BEHIND_ZOOM.forEach((sel) => { $(sel).inert = true; });
  $("#zoom").hidden = false;
  $("#zoom-close").focus();
}

function closeZoom() {
  if ($("#zoom").hidden) return;
  $("#zoom").hidden = true;
  BEHIND_ZOOM.forEach((sel) => { $(sel).inert = false; });
  state.zoomPath = null;
  $("#zoom-img").removeAttribute("src");
  document.activeElement?.blur();
  restoreFocus(state.zoomReturn);
}

async function zoomFailed() {
  const path = state.zoomPath;
  if (!path) return;
  const why = await whyUnshown(path);
  if (state.zoomPath !== path) return;
  $("#zoom-img").hidden = true;
  $("#zoom-error").textContent = why;
  $("#zoom-error").hidden = false;
}

// ---- data set browser
async function loadInfo() {
  state.info = await api("/api/info");
  state.classes = state.info.classes;
  const folders = [...state.classes, ...(state.info.counts[state.info.unlabeled_dir] !== undefined ? [state.info.unlabeled_dir] : [])];
  if (!folders.includes(state.browse.label)) state.browse.label = folders[0];
  $("#class-list").replaceChildren(...folders.map((c) => el("button", {
    class: c === state.browse.label ? "active" : "", "data-label": c, "aria-pressed": String(c === state.browse.label),
    onclick: () => keepingFocus(() => { state.browse = { label: c, page: 1 }; return loadInfo().then(() => loadBrowse()); }),
  }, `${c} (${state.info.counts[c] ?? 0})`)));
  $("#key-legend").textContent = state.classes.slice(0, 9).map((c, i) => `${i + 1} = ${c}`).join(", ");
}

// The latest request of each list: an answer to an earlier one is dropped (a confusion cell clicked while the
// Results tab loaded got its list drawn over by the whole tab's, which answered later).
const requested = {};
const request = (list) => { requested[list] = (requested[list] || 0) + 1; return requested[list]; };

async function loadBrowse(page = state.browse.page) {
  const mine = request("browse");
  const data = await api(`/api/images?${q({ label: state.browse.label, page, per_page: PER_PAGE })}`);
  if (mine !== requested.browse) return;
  state.browse.page = data.page;
  pager("browse", data, (p) => loadBrowse(p));
  $("#browse-grid").replaceChildren(...data.items.map((it) => el("div", { class: "card", "data-path": it.path },
    thumb(it.path, it.v), el("div", { class: "name" }, it.path), moveButtons(it.path, it.label, null))));
}

// ---- results browser
function fillSelect(sel, values, value) {
  sel.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
  sel.value = value;
}

// The run's confusion matrix, drawn once (120 classes: 14,400 cells); later only the cell shown changes.
async function loadConfusion() {
  const t = $("#confusion");
  if (t.rows.length) {
    t.querySelectorAll("td").forEach((td) => {
      const on = state.results.true === td.dataset.true && state.results.pred === td.dataset.pred;
      td.classList.toggle("selected", on);
      td.firstChild.setAttribute("aria-pressed", String(on));
    });
    return;
  }
  const data = await api("/api/confusion");
  const head = el("tr", {}, el("th", {}, "true \\ pred"), ...data.classes.map((c) => el("th", { scope: "col", title: c }, c)));
  const max = Math.max(1, ...data.matrix.flat());
  const rows = data.matrix.map((row, i) => el("tr", {}, el("th", { class: "rowhead", scope: "row", title: data.classes[i] }, data.classes[i]), ...row.map((n, j) => {
    const selected = state.results.true === data.classes[i] && state.results.pred === data.classes[j];
    const shade = i === j ? `rgba(22,163,74,${0.1 + 0.6 * n / max})` : (n ? `rgba(220,38,38,${0.15 + 0.6 * n / max})` : "#fff");
    const show = () => keepingFocus(() => { Object.assign(state.results, { true: data.classes[i], pred: data.classes[j], outcome: "all", page: 1 }); return loadResults(); });
    return el("td", {
      class: [i === j ? "diag" : "", selected ? "selected" : ""].join(" ").trim(),
      "data-true": data.classes[i], "data-pred": data.classes[j], style: `background:${shade}`,
    }, el("button", {
      class: "cell", "data-true": data.classes[i], "data-pred": data.classes[j], "aria-pressed": String(selected),
      "aria-label": `${plural(n, "image")} of ${data.classes[i]} predicted ${data.classes[j]}`, onclick: show,
    }, String(n)));
  })));
  t.replaceChildren(head, ...rows);
}

async function loadResults(page = state.results.page) {
  if (!state.info.run) { $("#no-run").hidden = false; $("#results-body").hidden = true; return; }
  const r = state.results;
  $("#res-outcome").value = r.outcome;
  $("#res-sort").value = r.sort;
  fillSelect($("#res-true"), state.info.run.classes, r.true);
  fillSelect($("#res-pred"), state.info.run.classes, r.pred);
  const mine = request("results");
  await loadConfusion();
  const data = await api(`/api/results?${q({ outcome: r.outcome, sort: r.sort, true: r.true, pred: r.pred, page, per_page: PER_PAGE })}`);
  if (mine !== requested.results) return;
  r.page = data.page;
  pager("results", data, (p) => loadResults(p));
  $("#results-grid").replaceChildren(...data.items.map((it) => el("div", { class: `card ${it.correct ? "right" : "wrong"}`, "data-path": it.path },
    it.now ? thumb(it.now, it.v) : el("div", { class: "hint" }, "(no longer in the data folder)"),
    el("div", { class: "labels" }, `${it.correct ? "✓ right" : "✗ wrong"}: ${it.true} → ${it.pred} (${(100 * it.confidence).toFixed(0)}%)`),
    el("div", { class: "name" }, it.now && it.now !== it.path ? `${it.path}, now ${it.now}` : it.path),
    bars(it.scores, data.classes, it.true, it.pred))));
}

// ---- suspected label errors and active learning
// What a tab without scores says instead: the analysis is off, running or failed.
function analysisNote(a, kind) {
  if (a.state === "done") return [];
  const compute = el("button", { class: "compute", onclick: () => keepingFocus(computeScores) }, "Compute scores");
  const why = a.state === "running" ? ["Computing features and scores…"]
    : a.state === "error" ? [`Analysis failed: ${a.error}. `, compute]
    : ["Scores are off: the app was started with --no-analysis. ", compute, " now, or start the app without --no-analysis."];
  const meanwhile = ` Meanwhile the images of ${state.info.unlabeled_dir}/ are listed by name: 1…9 label the highlighted one.`;
  return kind === "unlabeled" ? [...why, meanwhile] : why;
}

async function loadScored(kind, page) {
  const mine = request(kind);
  let data = await api(`/api/${kind}?${q({ page, per_page: PER_PAGE })}`);
  if (mine !== requested[kind]) return;
  const scored = data.analysis.state === "done";
  $(`#${kind}-note`).replaceChildren(...analysisNote(data.analysis, kind));
  if (!scored) data.items = [];
  if (!scored && kind === "unlabeled" && state.info.counts[state.info.unlabeled_dir] !== undefined) {
    data = await api(`/api/images?${q({ label: state.info.unlabeled_dir, page, per_page: PER_PAGE })}`);
    if (mine !== requested[kind]) return;
  }
  state[kind].page = data.page;
  pager(kind, data, (p) => loadScored(kind, p));
  if (kind === "unlabeled") {
    state.unlabeled.items = data.items;
    state.unlabeled.current = Math.min(state.unlabeled.current, Math.max(0, data.items.length - 1));
  }
  $(`#${kind}-grid`).replaceChildren(...data.items.map((it, n) => {
    const card = el("div", { class: "card", "data-path": it.path }, thumb(it.path, it.v));
    if (scored) {
      const title = kind === "suspects"
        ? `#${it.rank} labelled ${it.label}, p=${it.p_label.toFixed(2)} · suggests ${it.suggested}`
        : `suggests ${it.suggested} (margin ${it.margin.toFixed(2)})`;
      card.append(el("div", { class: "labels" }, title), el("div", { class: "name" }, it.path),
        bars(it.scores, data.classes, kind === "suspects" ? it.label : null, it.suggested), moveButtons(it.path, labelOf(it.path), it.suggested));
    } else {
      card.append(el("div", { class: "name" }, it.path), moveButtons(it.path, labelOf(it.path), null));
    }
    if (kind === "unlabeled") {
      if (n === state.unlabeled.current) { card.classList.add("current"); card.setAttribute("aria-current", "true"); }
      card.addEventListener("mouseenter", () => setCurrent(n));
      card.addEventListener("focusin", () => setCurrent(n));
    }
    return card;
  }));
}

// The highlighted image of the Unlabeled tab; moved by the keys (scroll), it takes the focus too.
function setCurrent(n, scroll = false) {
  state.unlabeled.current = n;
  document.querySelectorAll("#unlabeled-grid .card").forEach((c, i) => {
    c.classList.toggle("current", i === n);
    if (i === n) c.setAttribute("aria-current", "true"); else c.removeAttribute("aria-current");
    if (i === n && scroll) { c.querySelector("button")?.focus({ preventScroll: true }); c.scrollIntoView({ block: "nearest" }); }
  });
}

// Move the zoomed image, else the highlighted one, to label; the zoom closes after the move (or its failure:
// the page under it was refreshed).
async function labelShown(label) {
  const zoomed = $("#zoom").hidden ? null : state.zoomPath;
  const it = state.unlabeled.items[state.unlabeled.current];
  const path = zoomed || (it && it.path);
  if (!path) return;
  await relabel(path, label);
  if (zoomed && state.zoomPath === zoomed) closeZoom();
}

let keyMoves = Promise.resolve(); // digit-key moves, one after another: each acts on the image shown when its turn comes

document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape") { if ($("#zoom").hidden) hideToast(); else closeZoom(); return; }
  if (ev.key === "Tab" && !$("#zoom").hidden) { // round the zoom's buttons, not out of the page
    const stops = [...$("#zoom").querySelectorAll("button, select")];
    const at = stops.indexOf(document.activeElement);
    const next = ev.shiftKey ? (at <= 0 ? stops.length - 1 : at - 1) : (at + 1) % stops.length;
    stops[next].focus();
    ev.preventDefault();
    return;
  }
  if (state.tab !== "unlabeled" || ev.target.tagName === "SELECT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
    const last = state.unlabeled.items.length - 1;
    setCurrent(Math.max(0, Math.min(last, state.unlabeled.current + (ev.key === "ArrowRight" ? 1 : -1))), true);
  } else if (/^[1-9]$/.test(ev.key) && state.classes[Number(ev.key) - 1]) {
    const label = state.classes[Number(ev.key) - 1];
    keyMoves = keyMoves.then(() => keepingFocus(() => labelShown(label))).catch((e) => toast(e.message, true));
  }
});

// ---- analysis status, tabs, refresh
// The images the analysis could not read (kind "skipped") or not cross-check ("unchecked"), with why (open when
// they are few).
async function analysisList(kind, what) {
  const data = await api(`/api/${kind}?${q({ per_page: 100 })}`);
  return el("details", { class: "skipped", ...(data.total <= 3 ? { open: "" } : {}) },
    el("summary", {}, `${plural(data.total, "image")} ${what}`),
    el("ul", {}, ...data.items.map((it) => el("li", {}, `${it.path}: ${it.reason}`)),
      ...(data.total > data.items.length ? [el("li", {}, `…${andMore(data.items.length, data.total)} (GET /api/${kind} lists them all)`)] : [])));
}

async function pollStatus() {
  try {
    const s = await api("/api/analysis");
    const changed = s.state !== state.analysis;
    state.analysis = s.state;
    const text = s.state === "running" ? `computing label-error and active-learning scores… (${s.seconds}s)`
      : s.state === "error" ? `analysis failed: ${s.error}`
      : s.state === "done" ? `scores ready (${s.n_suspects} labelled, ${s.n_unlabeled} unlabeled images scored in ${s.seconds}s)`
      : "label-error and active-learning scores are off (--no-analysis)";
    $("#status").setAttribute("aria-busy", String(s.state === "running"));
    const lists = s.state !== "done" ? [] : [
      ...(s.n_skipped ? [await analysisList("skipped", "skipped: cannot be read")] : []),
      ...(s.n_unchecked ? [await analysisList("unchecked", "not ranked: the only image of their class")] : []),
    ];
    $("#status").replaceChildren(text, ...lists);
    if (s.state === "running") setTimeout(pollStatus, 1500);
    if ((changed || s.state !== "running") && (state.tab === "suspects" || state.tab === "unlabeled")) await loadTab();
  } catch (e) { $("#status").textContent = e.message; }
}

async function computeScores() {
  try { await api("/api/analysis", {}); } catch (e) { toast(e.message, true); return; }
  await pollStatus();
}

async function loadTab() {
  if (state.tab === "browse") await loadBrowse();
  else if (state.tab === "results") await loadResults();
  else await loadScored(state.tab, state[state.tab].page);
}

async function refresh() { await loadInfo(); await loadTab(); }

function showTab(tab) {
  state.tab = tab;
  document.querySelectorAll("#tabs button").forEach((b) => {
    b.classList.toggle("active", b.dataset.tab === tab);
    b.setAttribute("aria-pressed", String(b.dataset.tab === tab));
  });
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === `tab-${tab}`));
  // the classes anew too (a class folder made or removed outside the app); a tab clicked early waits for the first
  infoLoaded.catch(() => {}).then(refresh).catch((e) => toast(e.message, true));
}

// Back to the page: the classes and counts anew, the images too where they changed meanwhile.
async function refreshShown() {
  if (document.hidden) return;
  const before = JSON.stringify(state.info?.counts); // none: the first load failed (the data folder was gone)
  try {
    await keepingFocus(async () => { await loadInfo(); if (JSON.stringify(state.info.counts) !== before) await loadTab(); });
  } catch (e) { toast(e.message, true); }
}

new ResizeObserver(([e]) => { document.documentElement.style.scrollPaddingTop = `${e.target.offsetHeight + 8}px`; }).observe($("header"));
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
$("#undo-last").addEventListener("click", () => undo(false));
$("#undo-all").addEventListener("click", () => undo(true));
$("#zoom-close").addEventListener("click", closeZoom);
$("#zoom").addEventListener("click", (ev) => { if (ev.target.id === "zoom") closeZoom(); });
$("#zoom-img").addEventListener("error", zoomFailed);
$("#recompute").addEventListener("click", computeScores);
document.addEventListener("visibilitychange", refreshShown);
for (const [id, key] of [["#res-outcome", "outcome"], ["#res-sort", "sort"], ["#res-true", "true"], ["#res-pred", "pred"]]) {
  $(id).addEventListener("change", (ev) => { state.results[key] = ev.target.value; state.results.page = 1; loadResults(); });
}
const infoLoaded = loadInfo();
infoLoaded.then(loadBrowse).catch((e) => toast(e.message, true));
infoLoaded.then(pollStatus, pollStatus); // the status line, whether the images could be listed or not
