// The panel's webview script (bundled to dist/webview.js). It renders PanelState and posts FromPanel
// messages; the logic (reducer, suggestions, chart geometry) is in state.ts, jobs.ts and chart.ts, tested headless.
import { formatBytes, formatSeconds, layoutChart } from "../chart";
import { elapsedSeconds, isRunning, percent } from "../jobs";
import type { FromPanel, Section, ToPanel, TrainSettings } from "../messages";
import { DEFAULTS } from "../protocol";
import { addColumn, ask, chatPending, clearChat, columnMessages, initialState, reduce, removeColumn, setColumn, showJob,
  suggest } from "../state";
import type { ChatColumn, PanelState } from "../state";

interface VsCodeApi {
  postMessage(m: FromPanel): void;
  getState(): unknown;
  setState(s: unknown): void;
}
declare function acquireVsCodeApi(): VsCodeApi;

const vscode = acquireVsCodeApi();
let state: PanelState = initialState();
let chatSeq = 0;

// the protocol's defaults, stated once (protocol/protocol.json)
const T = DEFAULTS.TrainParams, LORA = DEFAULTS.LoraSettings, OPT = DEFAULTS.OptimizerSettings;
const INPUTS: Array<[keyof TrainSettings, string, number | string]> = [
  ["adapter", "adapter", "my-adapter"], ["r", "r", LORA.r], ["steps", "steps", 100], ["batchSize", "batch", T.batchSize],
  ["seqLen", "seq", T.seqLen], ["lr", "lr", OPT.lr], ["budgetMinutes", "budget", 15], ["valPercent", "val-percent", 10],
  ["evalEvery", "eval-every", 10],
];

const LAYOUT = `
<style>
  body { font-family: var(--vscode-font-family); font-size: var(--vscode-font-size); color: var(--vscode-foreground);
    padding: 0 14px 14px; }
  header { display: flex; flex-wrap: wrap; gap: 4px 16px; align-items: baseline; padding: 8px 0; }
  header h1 { font-size: 1.25em; margin: 0; }
  section { border-top: 1px solid var(--vscode-panel-border, rgba(128,128,128,.35)); padding: 8px 0 10px; }
  h2 { font-size: 1.05em; margin: 4px 0 8px; }
  label { margin-right: 10px; white-space: nowrap; display: inline-block; margin-bottom: 4px; }
  input[type=number] { width: 5.5em; } input[type=text] { width: 11em; }
  input, select, textarea { background: var(--vscode-input-background); color: var(--vscode-input-foreground);
    border: 1px solid var(--vscode-input-border, var(--vscode-panel-border, transparent)); padding: 2px 4px;
    font-family: inherit; font-size: inherit; }
  select { background: var(--vscode-dropdown-background); color: var(--vscode-dropdown-foreground);
    border-color: var(--vscode-dropdown-border, transparent); min-width: 10em; }
  button { background: var(--vscode-button-background); color: var(--vscode-button-foreground); border: none;
    padding: 4px 10px; margin: 2px 4px 2px 0; cursor: pointer; font-family: inherit; }
  button:hover:not(:disabled) { background: var(--vscode-button-hoverBackground); }
  button.secondary { background: var(--vscode-button-secondaryBackground); color: var(--vscode-button-secondaryForeground); }
  button:disabled { opacity: 0.5; cursor: default; }
  .muted { opacity: 0.75; } .error { color: var(--vscode-errorForeground); white-space: pre-wrap; }
  .error:empty { display: none; }
  table { border-collapse: collapse; margin: 4px 0; } td { padding: 1px 12px 1px 0; } td.num { text-align: right; }
  .bar { height: 6px; background: var(--vscode-progressBar-background); display: inline-block; vertical-align: middle; }
  .track { width: 160px; background: var(--vscode-editorWidget-border, rgba(128,128,128,.3)); display: inline-block;
    vertical-align: middle; height: 6px; margin: 0 6px; }
  #columns { display: flex; gap: 10px; align-items: stretch; overflow-x: auto; }
  .column { flex: 1 1 0; min-width: 220px; border: 1px solid var(--vscode-panel-border, rgba(128,128,128,.35)); padding: 6px; }
  .column .head { display: flex; gap: 6px; align-items: center; margin-bottom: 4px; }
  .column .head select { min-width: 0; flex: 1; } .column .head input { width: 4em; }
  .transcript { max-height: 300px; overflow-y: auto; }
  .turn { margin: 4px 0; white-space: pre-wrap; overflow-wrap: anywhere; } .turn.user { font-weight: 600; }
  .turn.streaming::after { content: "▍"; opacity: .6; }
  canvas { width: 100%; height: 220px; display: block; }
  textarea { width: 100%; box-sizing: border-box; margin-top: 6px; }
  .suggestion button { margin-right: 8px; }
</style>
<header><h1>LoRA Lab</h1><span id="model" class="muted"></span><span id="daemon" class="muted"></span></header>
<div id="err-daemon" class="error"></div><div id="daemon-actions"></div>
<section id="sec-plan"><h2>Plan</h2>
  <label>adapter <input id="adapter" type="text"></label>
  <label title="LoRA rank; alpha is 2 × rank">rank <input id="r" type="number" min="1" max="256"></label>
  <label>steps <input id="steps" type="number" min="1"></label>
  <label>batch <input id="batch" type="number" min="1"></label>
  <label title="tokens per sequence">seq <input id="seq" type="number" min="8" step="8"></label>
  <label>lr <input id="lr" type="number" step="0.0001"></label>
  <label title="the plan proposes settings that meet it">time budget (min) <input id="budget" type="number" min="0"></label>
  <div><button id="plan-btn">Estimate</button><button id="calibrate-btn" class="secondary">Calibrate</button>
    <button id="calibrate-cancel" class="secondary">Cancel calibration</button>
    <span id="calibrating" class="muted"></span></div>
  <div id="plan"></div><div id="suggestions"></div><div id="err-plan" class="error"></div>
</section>
<section id="sec-train"><h2>Train</h2>
  <button id="pick" class="secondary">Pick dataset…</button> <span id="dataset" class="muted"></span>
  <div id="err-dataset" class="error"></div>
  <div id="validation"><label title="when the data has no valid.jsonl">validation: hold out <input id="val-percent"
    type="number" min="0" max="50">%</label><label>eval every <input id="eval-every" type="number" min="0"> steps</label></div>
  <div><button id="train-btn">Start training</button><button id="cancel-btn" class="secondary">Cancel</button>
    <button id="resume-btn" class="secondary">Resume</button></div>
  <div id="train-stats"></div><div id="train-time" class="muted"></div>
  <canvas id="chart" width="600" height="220" aria-label="training loss, validation loss and learning rate by step"></canvas>
  <div id="train-message" class="muted"></div>
  <div id="err-train" class="error"></div>
  <details id="jobs-box" open><summary>Jobs</summary><table id="jobs"></table></details>
</section>
<section id="sec-chat"><h2>Chat — compare</h2>
  <div id="columns"></div>
  <textarea id="prompt" rows="3" placeholder="Ask every column (Ctrl+Enter sends)"></textarea>
  <div><button id="send">Send</button><button id="stop" class="secondary">Stop</button>
    <button id="add-column" class="secondary">Add column</button><button id="clear" class="secondary">Clear</button>
    <span id="chat-note" class="muted"></span></div>
  <div id="err-chat" class="error"></div>
</section>
<section id="sec-export"><h2>Export</h2>
  <select id="export-adapter"></select>
  <button data-format="peft">PEFT</button><button data-format="gguf">GGUF (llama.cpp)</button><button data-format="mlx">MLX</button>
  <div id="exported" class="muted"></div><div id="err-export" class="error"></div>
</section>`;

function el<E extends HTMLElement>(id: string): E {
  const e = document.getElementById(id);
  if (!e) throw new Error(`panel element #${id} is missing`);
  return e as E;
}

function make<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {},
                                                      ...children: Array<Node | string>): HTMLElementTagNameMap[K] {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

function settings(): TrainSettings {
  const out: Record<string, number | string> = {};
  for (const [key, id, fallback] of INPUTS) {
    const raw = el<HTMLInputElement>(id).value;
    if (typeof fallback === "string") { out[key] = raw.trim() || fallback; continue; }
    const v = Number(raw);
    out[key] = Number.isFinite(v) && (v > 0 || (v === 0 && ["budgetMinutes", "valPercent", "evalEvery"].includes(key))) ? v : fallback;
  }
  return out as unknown as TrainSettings;
}

function applySettings(patch: Partial<TrainSettings>): void {
  for (const [key, id] of INPUTS) {
    const v = patch[key];
    if (v !== undefined) el<HTMLInputElement>(id).value = String(v);
  }
  save();
}

function setOptions(sel: HTMLSelectElement, options: Array<[string, string]>, empty: string): void {
  const keep = sel.value;
  sel.replaceChildren(...(options.length ? options : [["", empty] as [string, string]]).map(([value, text]) =>
    make("option", { value, textContent: text })));
  sel.disabled = options.length === 0;
  if (options.some(([v]) => v === keep)) sel.value = keep;
}

// -- plan -------------------------------------------------------------------------------------------

const CALIBRATE_NOTE = /not calibrated yet/;

function renderPlan(s: PanelState): void {
  const plan = el("plan");
  plan.replaceChildren();
  const p = s.plan;
  if (p) {
    const t = make("table");
    const row = (k: string, v: string, num = true): void => {
      const tr = t.insertRow();
      tr.insertCell().textContent = k;
      const c = tr.insertCell();
      c.textContent = v;
      if (num) c.className = "num";
    };
    for (const part of p.parts.filter((x) => x.bytes > 0)) {  // parts that take no memory here are left out
      row(part.part, formatBytes(part.bytes) + (part.fraction !== null ? `  (${(100 * part.fraction).toFixed(1)}%)` : ""));
    }
    row("total", `${formatBytes(p.memory.total)} of ${formatBytes(p.availableBytes)}` +
      (p.fits === null ? "" : p.fits ? " — fits" : " — does not fit"));
    row("trainable parameters", p.loraParameters.toLocaleString());
    row("tokens/s", p.tokensPerSecond === null ? "not calibrated" : p.tokensPerSecond.toFixed(0));
    row("time", p.seconds === null ? "press Calibrate to predict it" : `${formatSeconds(p.seconds)} for ${p.steps} steps`);
    const notes = p.notes.filter((n) => !CALIBRATE_NOTE.test(n));
    plan.append(t, make("div", { className: "muted", textContent: [...p.warnings, ...p.advice.text].join(" ") || "" }));
    if (notes.length) {
      const d = make("details", {}, make("summary", { textContent: "how these numbers were obtained" }));
      for (const n of notes) d.append(make("div", { className: "muted", textContent: n }));
      plan.append(d);
    }
  }
  const sug = el("suggestions");
  sug.replaceChildren(...suggest(p, s.dataset, settings()).map((x) => make("div", { className: "suggestion" },
    make("button", { className: "secondary", textContent: "Apply", onclick: () => { applySettings(x.patch); estimate(); } }),
    x.text)));
  const c = s.calibration;
  el<HTMLButtonElement>("calibrate-btn").disabled = c.running;
  el<HTMLButtonElement>("plan-btn").disabled = s.planning || c.running;
  el("calibrate-cancel").style.display = c.running ? "" : "none";
  const cal = el("calibrating");
  cal.replaceChildren();
  if (c.running) {
    const pct = c.percentage ?? 0;
    const bar = make("span", { className: "bar" });
    bar.style.width = `${pct}%`;
    cal.append(make("span", { className: "track" }, bar), `calibrating: ${c.message || "timing short training steps on this device"}`);
  } else {
    cal.textContent = s.planning ? "estimating…" : c.message;
  }
}

function estimate(): void {
  vscode.postMessage({ type: "plan", settings: settings() });
}

// -- train ------------------------------------------------------------------------------------------

function renderTrain(s: PanelState): void {
  const d = s.dataset;
  el("dataset").textContent = d ? `${d.path}: ${d.examples} examples, ${d.tokens.toLocaleString()} tokens ` +
    `(${d.trainedTokens.toLocaleString()} trained; ${d.lengths.min}–${d.lengths.max} tokens each), ${d.format}` +
    (d.validation ? `; validation: ${d.validation.examples} examples` : "") +
    (d.problems.length ? `; ${d.problems.length} problems: ${d.problems[0].message}` : "") : "no dataset yet";
  el<HTMLInputElement>("val-percent").disabled = d?.validation != null;
  renderJobs(s);
  const j = s.job;
  const running = j !== null && isRunning(j);
  el<HTMLButtonElement>("train-btn").disabled = running || !d;
  el<HTMLButtonElement>("cancel-btn").disabled = !running;
  el("resume-btn").style.display = j && !running && j.resumable ? "" : "none";
  if (!j) {
    el("train-stats").textContent = d ? "" : "pick a dataset to train on";
    el("train-time").textContent = "";
    el("train-message").textContent = "";
    drawChart(s);
    return;
  }
  const parts = [`${j.adapter}: step ${j.step}/${j.totalSteps} (${percent(j)}%)`];
  if (j.loss !== null) parts.push(`loss ${j.loss.toFixed(4)}`);
  if (j.valLoss !== null) parts.push(`val ${j.valLoss.toFixed(4)}`);
  if (j.lr !== null) parts.push(`lr ${j.lr.toExponential(2)}`);
  if (j.tokensPerSecond !== null && running) parts.push(`${j.tokensPerSecond.toFixed(0)} tok/s`);
  el("train-stats").textContent = parts.join(" · ");
  const elapsed = elapsedSeconds(j, Date.now());
  const real = running ? `elapsed ${formatSeconds(elapsed)} · ETA ${formatSeconds(j.etaSeconds)}` : `took ${formatSeconds(elapsed)}`;
  const predicted = j.predictedSeconds !== null ? ` · plan predicted ${formatSeconds(j.predictedSeconds)}, real ` +
    `${formatSeconds(elapsed + (running ? j.etaSeconds ?? 0 : 0))}${running ? " so far + ETA" : ""}` : "";
  el("train-time").textContent = real + predicted;
  el("train-message").textContent = outcome(j);
  drawChart(s);
}

function renderJobs(s: PanelState): void {
  el("jobs-box").style.display = s.jobs.length ? "" : "none";
  const t = el<HTMLTableElement>("jobs");
  t.replaceChildren();
  for (const j of s.jobs) {
    const tr = t.insertRow();
    if (j.jobId === s.job?.jobId) tr.style.fontWeight = "600";
    tr.insertCell().textContent = j.adapter;
    tr.insertCell().textContent = isRunning(j) ? `training ${percent(j)}%` : j.state;
    tr.insertCell().textContent = `step ${j.step}/${j.totalSteps}`;
    tr.insertCell().textContent = new Date(j.startedAt).toLocaleString();
    const acts = tr.insertCell();
    const btn = (label: string, f: () => void): HTMLButtonElement => make("button", { className: "secondary", textContent: label, onclick: f });
    if (j.jobId !== s.job?.jobId) acts.append(btn("Show", () => update(showJob(state, j.jobId))));
    if (isRunning(j)) acts.append(btn("Cancel", () => vscode.postMessage({ type: "trainCancel", jobId: j.jobId })));
    else if (j.resumable) acts.append(btn("Resume", () => vscode.postMessage({ type: "trainResume", jobId: j.jobId })));
  }
}

function outcome(j: NonNullable<PanelState["job"]>): string {
  if (isRunning(j)) return j.message;
  if (j.state === "completed") return `completed: adapter ${j.adapter} saved (job ${j.jobId}); chat with it below.`;
  if (j.state === "cancelled" || j.state === "interrupted") {
    return `${j.state} at step ${j.step}/${j.totalSteps} (job ${j.jobId}, checkpointed)` +
      (j.resumable ? "; Resume continues it." : ".");
  }
  return `${j.state}${j.error ? `: ${j.error}` : ""} (job ${j.jobId})`;
}

function color(css: CSSStyleDeclaration, name: string, fallback: string): string {
  return css.getPropertyValue(name).trim() || fallback;
}

function drawChart(s: PanelState): void {
  const c = el<HTMLCanvasElement>("chart");
  const w = c.clientWidth || 600, h = c.clientHeight || 220, dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  if (!g) return;
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.body);
  const fg = color(css, "--vscode-foreground", "#ccc");
  const cLoss = color(css, "--vscode-charts-blue", "#3794ff"), cVal = color(css, "--vscode-charts-orange", "#d18616");
  const cLr = color(css, "--vscode-charts-green", "#89d185");
  const j = s.job;
  const lay = layoutChart({ loss: j?.lossPoints ?? [], val: j?.valPoints ?? [], lr: j?.lrPoints ?? [] }, w, h);
  const p = lay.plot;
  g.font = `11px ${css.getPropertyValue("--vscode-font-family") || "sans-serif"}`;
  g.fillStyle = fg; g.strokeStyle = fg;
  g.globalAlpha = 0.35;
  g.strokeRect(p.left, p.top, p.right - p.left, p.bottom - p.top);
  g.globalAlpha = 0.8;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (const t of lay.yTicks) g.fillText(t.value.toPrecision(3), p.left - 4, t.pos);
  g.textAlign = "left";
  for (const t of lay.lrTicks) g.fillText(t.value.toExponential(1), p.right + 4, t.pos);
  g.textAlign = "center"; g.textBaseline = "top";
  for (const t of lay.xTicks) g.fillText(String(t.value), t.pos, p.bottom + 3);
  g.fillText("step", (p.left + p.right) / 2, p.bottom + 17);  // axis titles
  g.save(); g.translate(10, (p.top + p.bottom) / 2); g.rotate(-Math.PI / 2); g.textBaseline = "middle";
  g.fillText("loss", 0, 0); g.restore();
  if (lay.lrTicks.length) {
    g.save(); g.translate(w - 8, (p.top + p.bottom) / 2); g.rotate(Math.PI / 2); g.textBaseline = "middle";
    g.fillText("learning rate", 0, 0); g.restore();
  }
  g.globalAlpha = 1;
  if (!j || (lay.raw.length === 0 && lay.val.length === 0)) {
    g.textAlign = "center"; g.textBaseline = "middle"; g.globalAlpha = 0.6;
    g.fillText(j ? "waiting for the first step…" : "the loss chart appears when training starts", (p.left + p.right) / 2, (p.top + p.bottom) / 2);
    g.globalAlpha = 1;
    return;
  }
  const stroke = (pts: Array<[number, number]>, col: string, alpha: number, width: number, dash: number[] = []): void => {
    if (pts.length === 0) return;
    g.strokeStyle = col; g.globalAlpha = alpha; g.lineWidth = width; g.setLineDash(dash);
    g.beginPath();
    pts.forEach(([x, y], i) => (i === 0 ? g.moveTo(x, y) : g.lineTo(x, y)));
    g.stroke();
    g.globalAlpha = 1; g.setLineDash([]);
  };
  stroke(lay.lr, cLr, 0.8, 1, [4, 3]);
  stroke(lay.raw, cLoss, 0.35, 1);
  stroke(lay.smooth, cLoss, 1, 2);
  stroke(lay.val, cVal, 1, 1.5);
  g.fillStyle = cVal;
  for (const [x, y] of lay.val) { g.beginPath(); g.arc(x, y, 3, 0, 2 * Math.PI); g.fill(); }
  // legend, top right inside the plot
  const items: Array<[string, string, boolean]> = [["training loss (smoothed)", cLoss, false]];
  if (lay.val.length) items.push(["validation loss", cVal, false]);
  if (lay.lr.length) items.push(["learning rate", cLr, true]);
  g.textAlign = "left"; g.textBaseline = "middle";
  let y = p.top + 10;
  const lw = Math.max(...items.map(([t]) => g.measureText(t).width)) + 26;
  const lx = p.right - 8 - lw;
  g.fillStyle = color(css, "--vscode-editor-background", "#1e1e1e");  // the legend stays readable over the lines
  g.globalAlpha = 0.85;
  g.fillRect(lx - 4, p.top + 2, lw + 8, items.length * 15 + 2);
  g.globalAlpha = 1;
  for (const [text, col, dashed] of items) {
    stroke([[lx, y], [lx + 18, y]], col, 1, 2, dashed ? [4, 3] : []);
    g.fillStyle = fg;
    g.fillText(text, lx + 24, y);
    y += 15;
  }
}

// -- chat: the compare view ------------------------------------------------------------------------------

function columnView(c: ChatColumn, s: PanelState): HTMLElement {
  const sel = make("select", { title: "what answers in this column" });
  setOptions(sel, [["", "Base model"], ...s.adapters.map((a): [string, string] => [a.name, `${a.name} (r=${a.r}, ${a.steps} steps)`])], "");
  sel.disabled = chatPending(s);
  sel.value = c.adapter ?? "";
  const scale = make("input", { type: "number", min: "0", max: "4", step: "0.25", value: String(c.scale),
                                title: "adapter scale (multiplies alpha/r; 0 = the base model)" });
  scale.style.display = c.adapter === null ? "none" : "";
  const change = (): void => update(setColumn(state, c.id, sel.value || null, Number(scale.value) >= 0 ? Number(scale.value) : 1));
  sel.onchange = change;
  scale.onchange = change;
  const remove = make("button", { className: "secondary", textContent: "×", title: "remove this column",
                                  disabled: s.columns.length <= 1 || chatPending(s), onclick: () => update(removeColumn(state, c.id)) });
  const transcript = make("div", { className: "transcript" }, ...c.turns.map((t, i) => {
    const streaming = c.pending !== null && i === c.turns.length - 1;
    return make("div", { className: `turn ${t.role}${streaming ? " streaming" : ""}` },
                t.role === "user" ? `you: ${t.content}` : t.content + (t.tokensPerSecond ? `  (${t.tokensPerSecond.toFixed(1)} tok/s)` : ""));
  }));
  const col = make("div", { className: "column" }, make("div", { className: "head" }, sel, scale, remove), transcript);
  col.dataset.adapter = c.adapter ?? "base";
  queueMicrotask(() => { transcript.scrollTop = transcript.scrollHeight; });
  return col;
}

function renderChat(s: PanelState): void {
  const focused = document.activeElement;
  const inColumns = focused instanceof HTMLElement && el("columns").contains(focused);
  if (!inColumns) el("columns").replaceChildren(...s.columns.map((c) => columnView(c, s)));
  const pending = chatPending(s);
  el<HTMLButtonElement>("send").disabled = pending || !s.model;
  el<HTMLButtonElement>("stop").disabled = !pending;
  el<HTMLButtonElement>("add-column").disabled = pending;
  el("chat-note").textContent = s.job && isRunning(s.job) ? "a job is training: answers run between its steps" : "";
}

function send(text?: string): void {
  const box = el<HTMLTextAreaElement>("prompt");
  const q = (text ?? box.value).trim();
  if (!q || chatPending(state)) return;
  const first = chatSeq + 1;
  chatSeq += state.columns.length;
  const before = state.columns;
  update(ask(state, first, q));
  box.value = "";
  before.forEach((c, i) => vscode.postMessage({ type: "chat", chatId: first + i, adapter: c.adapter, scale: c.scale,
                                                 messages: columnMessages(c, q) }));
}

// -- render, persist, wire ------------------------------------------------------------------------------

function render(s: PanelState): void {
  const m = s.model;
  el("model").textContent = m ? `${m.name} · ${m.architecture}, ${m.numLayers} layers, ` +
    `${(m.numParameters / 1e6).toFixed(1)} M parameters, ${formatBytes(m.weightBytes)} · ${m.backend}` : "";
  el("daemon").textContent = s.daemon.state === "ready" || s.daemon.state === "starting" ? `daemon: ${s.daemon.text}`
    : s.daemon.state === "failed" ? "daemon: could not start" : `daemon: not running (${s.daemon.text})`;
  for (const sec of ["daemon", "plan", "dataset", "train", "chat", "export"] as Section[]) {
    el(`err-${sec}`).textContent = s.errors[sec] ?? "";
  }
  const acts = el("daemon-actions");
  acts.replaceChildren(...(s.daemon.state === "failed" ? [
    make("button", { className: "secondary", textContent: "Open Settings",
                     onclick: () => vscode.postMessage({ type: "openSettings", setting: "loralab.pythonPath" }) })] : []));
  renderPlan(s);
  renderTrain(s);
  renderChat(s);
  setOptions(el<HTMLSelectElement>("export-adapter"), s.adapters.map((a): [string, string] => [a.name, a.name]),
             "no adapters yet — train one");
  document.querySelectorAll<HTMLButtonElement>("button[data-format]").forEach((b) => { b.disabled = s.adapters.length === 0; });
  const ex = s.exported;
  el("exported").textContent = ex ? `${ex.format}: ${ex.path} (${ex.files.length} file${ex.files.length === 1 ? "" : "s"}: ` +
    `${ex.files.map((f) => f.split(/[\\/]/).pop()).join(", ")})` : "";
}

function save(): void {
  vscode.setState({ columns: state.columns.map((c) => ({ ...c, pending: null })), settings: settings(),
                    dataset: state.dataset?.path ?? null });
}

function update(next: PanelState): void {
  state = next;
  save();
  render(state);
}

function onMessage(m: ToPanel): void {
  if (m.type === "settings") applySettings(m.settings);
  else if (m.type === "ask") send(m.prompt);
  else if (m.type === "focus") el(`sec-${m.section === "daemon" || m.section === "dataset" ? "train" : m.section}`).scrollIntoView();
  else if (m.type === "run" && m.what === "plan") estimate();
  else if (m.type === "run" && m.what === "train") {
    if (m.fit) for (const x of suggest(null, state.dataset, settings())) applySettings(x.patch);
    vscode.postMessage({ type: "trainStart", settings: settings() });
  }
  const before = state;
  state = reduce(state, m);
  if (m.type === "model" && m.model && before.model?.id !== m.model.id) estimate();  // a (new) model: plan for it
  if (m.type === "adapters" && before.adapters.length === 0 && m.adapters.length > 0 && state.columns.length === 1 &&
      state.columns[0].adapter === null && state.columns[0].turns.length === 0) {
    state = addColumn(state, m.adapters[m.adapters.length - 1].name);  // Base beside the newest adapter
  }
  if (m.type === "dataset" || m.type === "plan") save();
  render(state);
}

function main(): void {
  el("app").innerHTML = LAYOUT;
  const saved = vscode.getState() as { columns?: ChatColumn[]; settings?: Partial<TrainSettings>; dataset?: string | null } | undefined;
  for (const [key, id, fallback] of INPUTS) el<HTMLInputElement>(id).value = String(saved?.settings?.[key] ?? fallback);
  if (saved?.columns?.length) state = { ...state, columns: saved.columns.map((c) => ({ ...c, pending: null })) };
  el("plan-btn").onclick = estimate;
  el("calibrate-btn").onclick = () => vscode.postMessage({ type: "calibrate", settings: settings() });
  el("calibrate-cancel").onclick = () => vscode.postMessage({ type: "calibrateCancel" });
  el("pick").onclick = () => vscode.postMessage({ type: "pickDataset" });
  el("train-btn").onclick = () => vscode.postMessage({ type: "trainStart", settings: settings() });
  el("cancel-btn").onclick = () => { if (state.job) vscode.postMessage({ type: "trainCancel", jobId: state.job.jobId }); };
  el("resume-btn").onclick = () => { if (state.job) vscode.postMessage({ type: "trainResume", jobId: state.job.jobId }); };
  el("send").onclick = () => send();
  el("stop").onclick = () => vscode.postMessage({ type: "chatStop" });
  el("clear").onclick = () => update(clearChat(state));
  el("add-column").onclick = () => update(addColumn(state, state.adapters[state.adapters.length - 1]?.name ?? null));
  el("prompt").onkeydown = (e: KeyboardEvent) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); };
  for (const [, id] of INPUTS) el<HTMLInputElement>(id).onchange = () => { save(); render(state); };
  document.querySelectorAll<HTMLButtonElement>("button[data-format]").forEach((b) => {
    b.onclick = () => {
      const adapter = el<HTMLSelectElement>("export-adapter").value;
      const format = b.dataset.format;
      if (adapter && (format === "peft" || format === "gguf" || format === "mlx")) vscode.postMessage({ type: "export", adapter, format });
    };
  });
  window.addEventListener("message", (ev: MessageEvent<ToPanel>) => onMessage(ev.data));
  window.addEventListener("resize", () => drawChart(state));
  // VS Code swaps the body's theme class (and CSS variables) on a theme change: the canvas repaints in the new colours
  new MutationObserver(() => drawChart(state)).observe(document.body, { attributes: true, attributeFilter: ["class"] });
  setInterval(() => { if (state.job && isRunning(state.job)) renderTrain(state); }, 1000);  // the elapsed time
  render(state);
  vscode.postMessage({ type: "ready", dataset: saved?.dataset ?? null });  // the model comes back, and the plan follows
}

main();
