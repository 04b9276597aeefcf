// The panel's webview script (bundled to dist/webview.js). It renders PanelState and posts FromPanel
// messages; the logic (reducer, chart geometry) is in state.ts and chart.ts, tested headless.
import { formatBytes, formatSeconds, layoutChart } from "../chart";
import type { FromPanel, Section, ToPanel, TrainSettings } from "../messages";
import { DEFAULTS } from "../protocol";
import { askChat, chatHistory, initialState, reduce } from "../state";
import type { PanelState } from "../state";

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

const LAYOUT = `
<style>
  body { font-family: var(--vscode-font-family); color: var(--vscode-foreground); padding: 0 12px; }
  section { border-top: 1px solid var(--vscode-panel-border); padding: 8px 0; }
  h2 { font-size: 1.05em; margin: 4px 0 8px; }
  label { margin-right: 10px; white-space: nowrap; }
  input[type=number] { width: 6em; } input[type=text] { width: 12em; }
  input, select, textarea { background: var(--vscode-input-background); color: var(--vscode-input-foreground);
    border: 1px solid var(--vscode-input-border, transparent); }
  button { background: var(--vscode-button-background); color: var(--vscode-button-foreground); border: none;
    padding: 4px 10px; margin: 2px 4px 2px 0; cursor: pointer; }
  button:disabled { opacity: 0.5; cursor: default; }
  .muted { opacity: 0.75; } .error { color: var(--vscode-errorForeground); white-space: pre-wrap; }
  table { border-collapse: collapse; } td { padding: 1px 10px 1px 0; }
  #transcript { max-height: 320px; overflow-y: auto; }
  .turn { margin: 4px 0; white-space: pre-wrap; overflow-wrap: anywhere; } .turn.user { font-weight: 600; }
  canvas { width: 100%; height: 180px; }
  textarea { width: 100%; box-sizing: border-box; }
</style>
<div id="daemon" class="muted"></div><div id="model" class="muted"></div><div id="err-daemon" class="error"></div>
<section><h2>Plan</h2>
  <label>adapter <input id="adapter" type="text" value="my-adapter"></label>
  <label>rank <input id="r" type="number" min="1" max="256" value="${LORA.r}"></label>
  <label>steps <input id="steps" type="number" min="1" value="100"></label>
  <label>batch <input id="batch" type="number" min="1" value="${T.batchSize}"></label>
  <label>seq <input id="seq" type="number" min="8" value="${T.seqLen}"></label>
  <label>lr <input id="lr" type="number" step="0.0001" value="${OPT.lr}"></label>
  <div><button id="plan-btn">Estimate</button><button id="calibrate-btn">Calibrate</button>
    <span id="calibrating" class="muted"></span></div>
  <div id="plan"></div><div id="err-plan" class="error"></div>
</section>
<section><h2>Train</h2>
  <button id="pick">Pick dataset…</button><span id="dataset" class="muted"></span>
  <div id="err-dataset" class="error"></div>
  <div><button id="train-btn">Start training</button><button id="cancel-btn">Cancel</button></div>
  <div id="train-stats"></div>
  <canvas id="chart" width="600" height="180"></canvas>
  <div id="err-train" class="error"></div>
</section>
<section><h2>Chat</h2>
  <label><input type="radio" name="mode" id="mode-base" checked> Base</label>
  <label><input type="radio" name="mode" id="mode-lora"> LoRA</label>
  <select id="chat-adapter"></select>
  <div id="transcript"></div>
  <textarea id="prompt" rows="3" placeholder="Ask something (Ctrl+Enter sends)"></textarea>
  <div><button id="send">Send</button><button id="stop">Stop</button><button id="clear">Clear</button></div>
  <div id="err-chat" class="error"></div>
</section>
<section><h2>Export</h2>
  <select id="export-adapter"></select>
  <button data-format="peft">PEFT</button><button data-format="gguf">GGUF (llama.cpp)</button><button data-format="mlx">MLX</button>
  <div id="exported" class="muted"></div><div id="err-export" class="error"></div>
</section>`;

function el<T extends HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`panel element #${id} is missing`);
  return e as T;
}

function num(id: string, fallback: number): number {
  const v = Number(el<HTMLInputElement>(id).value);
  return Number.isFinite(v) && v > 0 ? v : fallback;
}

function settings(): TrainSettings {
  return { adapter: el<HTMLInputElement>("adapter").value.trim() || "my-adapter", r: num("r", LORA.r),
           steps: num("steps", 100), batchSize: num("batch", T.batchSize), seqLen: num("seq", T.seqLen),
           lr: num("lr", OPT.lr) };
}

function setOptions(sel: HTMLSelectElement, names: string[]): void {
  const keep = sel.value;
  sel.replaceChildren(...names.map((n) => { const o = document.createElement("option"); o.value = o.textContent = n; return o; }));
  if (names.includes(keep)) sel.value = keep;
}

function drawChart(s: PanelState): void {
  const c = el<HTMLCanvasElement>("chart");
  const w = c.clientWidth || 600, h = c.clientHeight || 180, dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  if (!g) return;
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.body);
  const fg = css.getPropertyValue("--vscode-foreground").trim() || "#ccc";
  const accent = css.getPropertyValue("--vscode-charts-blue").trim() || "#3794ff";
  const lay = layoutChart(s.train.points, w, h);
  g.font = "10px sans-serif";
  g.fillStyle = fg;
  g.globalAlpha = 0.6;
  for (const t of lay.yTicks) g.fillText(t.value.toPrecision(3), 2, t.pos + 3);
  for (const t of lay.xTicks) g.fillText(String(t.value), t.pos - 6, h - 4);
  g.globalAlpha = 1;
  const stroke = (pts: Array<[number, number]>, color: string, alpha: number, width: number): void => {
    if (pts.length === 0) return;
    g.strokeStyle = color; g.globalAlpha = alpha; g.lineWidth = width;
    g.beginPath();
    pts.forEach(([x, y], i) => (i === 0 ? g.moveTo(x, y) : g.lineTo(x, y)));
    g.stroke();
    g.globalAlpha = 1;
  };
  stroke(lay.raw, accent, 0.35, 1);
  stroke(lay.smooth, accent, 1, 2);
}

function render(s: PanelState): void {
  el("daemon").textContent = `daemon: ${s.daemon.text}`;
  el("model").textContent = s.model ? `model: ${s.model.name} — ${s.model.architecture}, ${s.model.numLayers} layers, ` +
    `${(s.model.numParameters / 1e6).toFixed(1)} M parameters, ${formatBytes(s.model.weightBytes)}, ${s.model.backend}` : "";
  for (const sec of ["daemon", "plan", "dataset", "train", "chat", "export"] as Section[]) {
    el(`err-${sec}`).textContent = s.errors[sec] ?? "";
  }
  el<HTMLButtonElement>("calibrate-btn").disabled = s.calibrating;
  el("calibrating").textContent = s.calibrating ? "timing a few short training steps on this device…" : "";
  const plan = el("plan");
  plan.replaceChildren();
  if (s.plan) {
    const p = s.plan, t = document.createElement("table");
    const rows: Array<[string, string]> = [
      ...Object.entries(p.memory).map(([k, v]): [string, string] => [k, formatBytes(v)]),
      ["available", formatBytes(p.availableBytes)], ["fits", p.fits === null ? "unknown" : p.fits ? "yes" : "no"],
      ["trainable parameters", p.loraParameters.toLocaleString()],
      ["tokens/s", p.tokensPerSecond === null ? "not calibrated" : p.tokensPerSecond.toFixed(0)],
      ["time", formatSeconds(p.seconds)]];
    for (const [k, v] of rows) {
      const tr = t.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = v;
    }
    const notes = document.createElement("div");
    notes.className = "muted";
    notes.textContent = p.notes.join(" · ");
    plan.append(t, notes);
  }
  el("dataset").textContent = s.dataset ? ` ${s.dataset.path}: ${s.dataset.examples} examples, ${s.dataset.tokens} tokens ` +
    `(${s.dataset.trainedTokens} trained), ${s.dataset.format}` + (s.dataset.problems.length ? `, ${s.dataset.problems.length} problems` : "") : "";
  const t = s.train;
  el("train-stats").textContent = t.totalSteps ? `step ${t.step}/${t.totalSteps} · loss ${t.loss?.toFixed(4) ?? "-"}` +
    (t.valLoss !== null ? ` · val ${t.valLoss.toFixed(4)}` : "") +
    ` · ${t.tokensPerSecond?.toFixed(0) ?? "-"} tok/s · ETA ${formatSeconds(t.etaSeconds)} · ${t.message}` : t.message;
  el<HTMLButtonElement>("train-btn").disabled = t.running;
  el<HTMLButtonElement>("cancel-btn").disabled = !t.running;
  drawChart(s);
  const names = s.adapters.map((a) => a.name);
  setOptions(el<HTMLSelectElement>("chat-adapter"), names);
  setOptions(el<HTMLSelectElement>("export-adapter"), names);
  const tr = el("transcript");
  tr.replaceChildren(...s.turns.map((turn) => {
    const d = document.createElement("div");
    d.className = `turn ${turn.role}`;
    const who = turn.role === "user" ? "you" : turn.adapter ?? "base";
    d.textContent = `${who}: ${turn.content}` + (turn.tokensPerSecond ? `  (${turn.tokensPerSecond.toFixed(1)} tok/s)` : "");
    return d;
  }));
  tr.scrollTop = tr.scrollHeight;
  el<HTMLButtonElement>("send").disabled = s.pendingChat !== null;
  el<HTMLButtonElement>("stop").disabled = s.pendingChat === null;
  el("exported").textContent = s.exported ? `${s.exported.format}: ${s.exported.path} (${s.exported.files.length} files)` : "";
}

function update(next: PanelState): void {
  state = next;
  vscode.setState({ turns: state.turns });
  render(state);
}

function send(): void {
  const box = el<HTMLTextAreaElement>("prompt");
  const text = box.value.trim();
  if (!text || state.pendingChat !== null) return;
  const lora = el<HTMLInputElement>("mode-lora").checked;
  const adapter = lora ? el<HTMLSelectElement>("chat-adapter").value || null : null;
  if (lora && !adapter) {
    update(reduce(state, { type: "error", section: "chat", message: "no adapter yet: train one, or pick Base" }));
    return;
  }
  const history = chatHistory(state);
  const id = ++chatSeq;
  update(askChat(state, id, text, adapter));
  box.value = "";
  vscode.postMessage({ type: "chat", chatId: id, adapter, messages: [...history, { role: "user", content: text }] });
}

function main(): void {
  el("app").innerHTML = LAYOUT;
  const saved = vscode.getState() as { turns?: PanelState["turns"] } | undefined;
  if (saved?.turns) state = { ...state, turns: saved.turns.filter((t) => t.content !== "") };
  el("plan-btn").onclick = () => vscode.postMessage({ type: "plan", settings: settings() });
  el("calibrate-btn").onclick = () => vscode.postMessage({ type: "calibrate", settings: settings() });
  el("pick").onclick = () => vscode.postMessage({ type: "pickDataset" });
  el("train-btn").onclick = () => vscode.postMessage({ type: "trainStart", settings: settings() });
  el("cancel-btn").onclick = () => vscode.postMessage({ type: "trainCancel" });
  el("send").onclick = send;
  el("stop").onclick = () => vscode.postMessage({ type: "chatStop" });
  el("clear").onclick = () => update({ ...state, turns: [], pendingChat: null });
  el("prompt").onkeydown = (e: KeyboardEvent) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); };
  document.querySelectorAll<HTMLButtonElement>("button[data-format]").forEach((b) => {
    b.onclick = () => {
      const adapter = el<HTMLSelectElement>("export-adapter").value;
      const format = b.dataset.format;
      if (!adapter) update(reduce(state, { type: "error", section: "export", message: "no adapter to export yet" }));
      else if (format === "peft" || format === "gguf" || format === "mlx") vscode.postMessage({ type: "export", adapter, format });
    };
  });
  window.addEventListener("message", (ev: MessageEvent<ToPanel>) => update(reduce(state, ev.data)));
  window.addEventListener("resize", () => drawChart(state));
  render(state);
  vscode.postMessage({ type: "ready" });
  vscode.postMessage({ type: "plan", settings: settings() });
}

main();
