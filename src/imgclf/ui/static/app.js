// imgclf review app: plain JS, no dependencies. Every list is paged by the server.
"use strict";

const PER_PAGE = 60;
const state = {
  tab: "browse", info: null, classes: [],
  browse: { label: null, page: 1 },
  results: { page: 1, outcome: "all", sort: "confidence_asc", true: "", pred: "" },
  suspects: { page: 1 }, unlabeled: { page: 1, current: 0, items: [] },
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

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(typeof data.detail === "string" ? data.detail : `${r.status} ${r.statusText}`);
  return data;
}

let toastTimer = null;
function toast(msg, error = false) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = "show" + (error ? " error" : "");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.className = ""; }, 3500);
}

const thumb = (path) => el("img", { src: `/api/thumb?${q({ path, size: 256 })}`, loading: "lazy", alt: path, onclick: () => zoom(path) });

function bars(scores, classes, trueLabel, predLabel) {
  const box = el("div", { class: "bars" });
  classes.forEach((c, i) => {
    const cls = ["bar", c === trueLabel ? "true" : "", c === predLabel ? "pred" : ""].join(" ").trim();
    const fill = el("div", { style: `width:${(100 * scores[i]).toFixed(1)}%` });
    box.append(el("span", {}, c), el("div", { class: cls, title: scores[i].toFixed(3) }, fill), el("span", {}, scores[i].toFixed(2)));
  });
  return box;
}

function moveButtons(path, current, suggested) {
  const box = el("div", { class: "buttons" });
  state.classes.forEach((c, i) => {
    if (c === current) return;
    const b = el("button", { "data-label": c, title: `Move to ${c}`, onclick: () => relabel(path, c) }, `${i < 9 ? i + 1 + " " : ""}${c}`);
    if (c === suggested) b.style.fontWeight = "700";
    box.append(b);
  });
  return box;
}

function pager(name, data, go) {
  const box = document.querySelector(`.pager[data-for="${name}"]`);
  const pages = Math.max(1, Math.ceil(data.total / data.per_page));
  box.replaceChildren(
    el("button", { class: "prev", onclick: () => go(data.page - 1), ...(data.page <= 1 ? { disabled: "" } : {}) }, "‹ Prev"),
    el("span", { class: "page-info" }, `page ${data.page} / ${pages} · ${data.total} images`),
    el("button", { class: "next", onclick: () => go(data.page + 1), ...(data.page >= pages ? { disabled: "" } : {}) }, "Next ›"),
  );
}

async function relabel(path, label) {
  try {
    const rec = await api("/api/relabel", { path, label });
    toast(`moved ${rec.from} → ${rec.to}`);
    await refresh();
  } catch (e) { toast(e.message, true); }
}

async function undo(all) {
  try {
    const r = await api("/api/undo", { all });
    toast(r.undone.length ? `undone: ${r.undone.map((m) => m.to + " → " + m.from).join(", ")}` : (r.problems[0] || "nothing to undo"), r.problems.length > 0);
    await refresh();
  } catch (e) { toast(e.message, true); }
}

// The class of an image path: its first folder, or its second in a data folder laid out by split (train/ants/x.jpg).
function labelOf(path) {
  const parts = path.split("/");
  return state.info && state.info.splits.includes(parts[0]) && parts.length > 2 ? parts[1] : parts[0];
}

function zoom(path) {
  $("#zoom-img").src = `/api/image?${q({ path })}`;
  $("#zoom-path").textContent = path;
  const current = labelOf(path);
  $("#zoom-labels").replaceChildren(moveButtons(path, current, null));
  $("#zoom-labels").querySelectorAll("button").forEach((b) => b.addEventListener("click", closeZoom));
  $("#zoom").hidden = false;
}
function closeZoom() { $("#zoom").hidden = true; $("#zoom-img").removeAttribute("src"); }

// ---- data set browser
async function loadInfo() {
  state.info = await api("/api/info");
  state.classes = state.info.classes;
  const folders = [...state.classes, ...(state.info.counts[state.info.unlabeled_dir] !== undefined ? [state.info.unlabeled_dir] : [])];
  if (!folders.includes(state.browse.label)) state.browse.label = folders[0];
  $("#class-list").replaceChildren(...folders.map((c) => el("button", {
    class: c === state.browse.label ? "active" : "", "data-label": c,
    onclick: () => { state.browse = { label: c, page: 1 }; loadInfo().then(loadBrowse); },
  }, `${c} (${state.info.counts[c] ?? 0})`)));
  $("#key-legend").textContent = state.classes.slice(0, 9).map((c, i) => `${i + 1} = ${c}`).join(", ");
}

async function loadBrowse(page = state.browse.page) {
  const data = await api(`/api/images?${q({ label: state.browse.label, page, per_page: PER_PAGE })}`);
  state.browse.page = data.page;
  pager("browse", data, (p) => loadBrowse(p));
  $("#browse-grid").replaceChildren(...data.items.map((it) => el("div", { class: "card", "data-path": it.path },
    thumb(it.path), el("div", { class: "name" }, it.path), moveButtons(it.path, it.label, null))));
}

// ---- results browser
function fillSelect(sel, values, value) {
  sel.replaceChildren(el("option", { value: "" }, "any"), ...values.map((v) => el("option", { value: v }, v)));
  sel.value = value;
}

async function loadConfusion() {
  const data = await api("/api/confusion");
  const t = $("#confusion");
  const head = el("tr", {}, el("th", {}, "true \\ pred"), ...data.classes.map((c) => el("th", {}, c)));
  const max = Math.max(1, ...data.matrix.flat());
  const rows = data.matrix.map((row, i) => el("tr", {}, el("th", { class: "rowhead" }, data.classes[i]), ...row.map((n, j) => {
    const selected = state.results.true === data.classes[i] && state.results.pred === data.classes[j];
    const shade = i === j ? `rgba(22,163,74,${0.1 + 0.6 * n / max})` : (n ? `rgba(220,38,38,${0.15 + 0.6 * n / max})` : "#fff");
    return el("td", {
      class: [i === j ? "diag" : "", selected ? "selected" : ""].join(" ").trim(),
      "data-true": data.classes[i], "data-pred": data.classes[j], style: `background:${shade}`,
      onclick: () => { Object.assign(state.results, { true: data.classes[i], pred: data.classes[j], outcome: "all", page: 1 }); loadResults(); },
    }, String(n));
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
  await loadConfusion();
  const data = await api(`/api/results?${q({ outcome: r.outcome, sort: r.sort, true: r.true, pred: r.pred, page, per_page: PER_PAGE })}`);
  r.page = data.page;
  pager("results", data, (p) => loadResults(p));
  $("#results-grid").replaceChildren(...data.items.map((it) => el("div", { class: `card ${it.correct ? "right" : "wrong"}`, "data-path": it.path },
    it.now ? thumb(it.now) : el("div", { class: "hint" }, "(no longer in the data folder)"),
    el("div", { class: "labels" }, `${it.true} → ${it.pred} (${(100 * it.confidence).toFixed(0)}%)`),
    el("div", { class: "name" }, it.now && it.now !== it.path ? `${it.path}, now ${it.now}` : it.path),
    bars(it.scores, data.classes, it.true, it.pred))));
}

// ---- suspected label errors and active learning
async function loadScored(kind, page) {
  const data = await api(`/api/${kind}?${q({ page, per_page: PER_PAGE })}`);
  state[kind].page = data.page;
  pager(kind, data, (p) => loadScored(kind, p));
  const grid = $(`#${kind}-grid`);
  if (data.analysis.state !== "done") {
    grid.replaceChildren(el("p", { class: "hint" }, data.analysis.state === "error" ? `analysis failed: ${data.analysis.error}` : "computing features and scores…"));
    return;
  }
  if (kind === "unlabeled") {
    state.unlabeled.items = data.items;
    state.unlabeled.current = Math.min(state.unlabeled.current, Math.max(0, data.items.length - 1));
  }
  grid.replaceChildren(...data.items.map((it, n) => {
    const current = labelOf(it.path);
    const title = kind === "suspects"
      ? `#${it.rank} labelled ${it.label}, p=${it.p_label.toFixed(2)} · suggests ${it.suggested}`
      : `suggests ${it.suggested} (margin ${it.margin.toFixed(2)})`;
    const card = el("div", { class: "card", "data-path": it.path },
      thumb(it.path), el("div", { class: "labels" }, title), el("div", { class: "name" }, it.path),
      bars(it.scores, data.classes, kind === "suspects" ? it.label : null, it.suggested), moveButtons(it.path, current, it.suggested));
    if (kind === "unlabeled") {
      if (n === state.unlabeled.current) card.classList.add("current");
      card.addEventListener("mouseenter", () => setCurrent(n));
    }
    return card;
  }));
}

function setCurrent(n) {
  state.unlabeled.current = n;
  document.querySelectorAll("#unlabeled-grid .card").forEach((c, i) => c.classList.toggle("current", i === n));
}

document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape") { closeZoom(); return; }
  if (state.tab !== "unlabeled" || ev.target.tagName === "SELECT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const items = state.unlabeled.items;
  if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
    setCurrent(Math.max(0, Math.min(items.length - 1, state.unlabeled.current + (ev.key === "ArrowRight" ? 1 : -1))));
  } else if (/^[1-9]$/.test(ev.key)) {
    const label = state.classes[Number(ev.key) - 1];
    const it = items[state.unlabeled.current];
    if (label && it) relabel(it.path, label);
  }
});

// ---- analysis status, tabs, refresh
async function pollStatus() {
  try {
    const s = await api("/api/analysis");
    $("#status").textContent = s.state === "running" ? `computing label-error and active-learning scores… (${s.seconds}s)`
      : s.state === "error" ? `analysis failed: ${s.error}`
      : s.state === "done" ? `scores ready (${s.n_suspects} labelled, ${s.n_unlabeled} unlabeled images scored in ${s.seconds}s)` : "";
    if (s.state === "running") setTimeout(pollStatus, 1500);
    else if (state.tab === "suspects" || state.tab === "unlabeled") await loadTab();
  } catch (e) { $("#status").textContent = e.message; }
}

async function loadTab() {
  if (state.tab === "browse") await loadBrowse();
  else if (state.tab === "results") await loadResults();
  else await loadScored(state.tab, state[state.tab].page);
}

async function refresh() { await loadInfo(); await loadTab(); }

function showTab(tab) {
  state.tab = tab;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll(".tab").forEach((s) => s.classList.toggle("active", s.id === `tab-${tab}`));
  loadTab().catch((e) => toast(e.message, true));
}

document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
$("#undo-last").addEventListener("click", () => undo(false));
$("#undo-all").addEventListener("click", () => undo(true));
$("#zoom-close").addEventListener("click", closeZoom);
$("#zoom").addEventListener("click", (ev) => { if (ev.target.id === "zoom") closeZoom(); });
$("#recompute").addEventListener("click", async () => { await api("/api/analysis", {}); pollStatus(); });
for (const [id, key] of [["#res-outcome", "outcome"], ["#res-sort", "sort"], ["#res-true", "true"], ["#res-pred", "pred"]]) {
  $(id).addEventListener("change", (ev) => { state.results[key] = ev.target.value; state.results.page = 1; loadResults(); });
}
loadInfo().then(loadBrowse).then(pollStatus).catch((e) => toast(e.message, true));
