// The LoRA Lab panel, extension side: a webview (dist/webview.js renders it) whose messages become
// daemon requests. One panel at a time; what it shows lives in state.ts, folded from ToPanel messages.
// Training jobs belong to Ctx (and the daemon): the panel shows them, and finds them again after a reload.
import * as crypto from "crypto";
import * as vscode from "vscode";
import { CancellationTokenSource } from "vscode-jsonrpc";
import { describeError } from "./api";
import { exportAdapter } from "./actions";
import type { Ctx } from "./ctx";
import { readConfig } from "./ctx";
import { isFromPanel } from "./messages";
import type { DaemonState, FromPanel, Section, ToPanel, TrainSettings } from "./messages";
import { ErrorCodes } from "./protocol";
import type { ChatMessage, DatasetInfo, ExportFormat, ModelInfo, PlanParams, TrainParams } from "./protocol";

export const VIEW_TYPE = "loralab.panel";

export class Panel implements vscode.Disposable {
  private static current: Panel | undefined;
  private readonly subs: vscode.Disposable[] = [];
  private dataset: DatasetInfo | undefined;
  private readonly chats = new Map<number, CancellationTokenSource>();
  private calibration: CancellationTokenSource | undefined;
  private disposed = false;
  private ready = false;
  private readonly queued: ToPanel[] = [];  // messages for a webview that has not loaded yet
  private daemonState: DaemonState;

  static show(ctx: Ctx, extensionUri: vscode.Uri): Panel {
    if (Panel.current) {
      Panel.current.panel.reveal();
      return Panel.current;
    }
    const panel = vscode.window.createWebviewPanel(VIEW_TYPE, "LoRA Lab", vscode.ViewColumn.Active, {
      enableScripts: true, retainContextWhenHidden: true,
      localResourceRoots: [vscode.Uri.joinPath(extensionUri, "dist")],
    });
    Panel.current = new Panel(panel, ctx, extensionUri);
    return Panel.current;
  }

  /** A panel VS Code restores after a reload. */
  static revive(panel: vscode.WebviewPanel, ctx: Ctx, extensionUri: vscode.Uri): void {
    Panel.current?.dispose();
    Panel.current = new Panel(panel, ctx, extensionUri);
  }

  private constructor(private readonly panel: vscode.WebviewPanel, private readonly ctx: Ctx, extensionUri: vscode.Uri) {
    this.daemonState = ctx.state;
    panel.webview.options = { enableScripts: true, localResourceRoots: [vscode.Uri.joinPath(extensionUri, "dist")] };
    panel.webview.html = html(panel.webview, vscode.Uri.joinPath(extensionUri, "dist", "webview.js"));
    this.subs.push(
      panel.onDidDispose(() => this.dispose()),
      panel.webview.onDidReceiveMessage((m: unknown) => {
        if (isFromPanel(m)) void this.handle(m);
        else ctx.output.appendLine(`LoRA Lab: ignored a malformed panel message: ${JSON.stringify(m).slice(0, 200)}`);
      }),
      ctx.onDidChangeState((s) => {
        this.post({ type: "daemon", state: s.state, text: s.text });
        // a daemon that came (back) up: load the model, list adapters and jobs again, without a click
        if (s.state === "ready" && this.daemonState !== "ready" && this.ready) void this.refresh();
        this.daemonState = s.state;
      }),
      ctx.onDidChangeJob((job) => {
        this.post({ type: "job", job });
        if (job.state === "completed") void this.adapters();
      }),
      ctx.onDidChangeModel((m) => {
        if (m) this.post({ type: "model", model: m });
        else if (this.ready) void this.refresh();
      }),
    );
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (Panel.current === this) Panel.current = undefined;
    for (const c of this.chats.values()) c.cancel();  // a running training job keeps going in the daemon
    this.calibration?.cancel();
    for (const s of this.subs.splice(0)) s.dispose();
    this.panel.dispose();
  }

  /** Messages to a closed panel are dropped (a request may answer after the user closed it). */
  post(m: ToPanel): void {
    if (this.disposed) return;
    if (!this.ready) { this.queued.push(m); return; }
    try {
      void this.panel.webview.postMessage(m).then(undefined, () => undefined);
    } catch { /* disposed meanwhile */ }
  }

  private fail(section: Section, e: unknown): void {
    // a daemon that could not start is said once, at the top, not again in every section that needed it
    if (section !== "daemon" && this.ctx.state === "failed") return;
    this.post({ type: "error", section, message: describeError(e).message });
  }

  private async model(): Promise<ModelInfo> {
    const m = await this.ctx.ensureModel();
    this.post({ type: "model", model: m });
    return m;
  }

  /** From a palette command: press Estimate or Start training with the panel's settings. */
  run(what: "plan" | "train"): void {
    this.post({ type: "focus", section: what === "plan" ? "plan" : "train" });
    this.post({ type: "run", what });
  }

  /** From the palette's Chat: the question goes to every column of the compare view. */
  ask(prompt: string): void {
    this.post({ type: "focus", section: "chat" });
    this.post({ type: "ask", prompt });
  }

  /** The explorer's "Train on This File": inspect it, then start training with the panel's settings. */
  async trainOn(uri: vscode.Uri, adapter: string): Promise<void> {
    this.post({ type: "focus", section: "train" });
    if (await this.useDataset(uri.fsPath)) {
      this.post({ type: "settings", settings: { adapter } });
      this.post({ type: "run", what: "train", fit: true });
    }
  }

  private async handle(m: FromPanel): Promise<void> {
    switch (m.type) {
      case "ready": return this.onReady(m.dataset);
      case "plan": return this.plan(m.settings);
      case "calibrate": return this.calibrate(m.settings);
      case "calibrateCancel": this.calibration?.cancel(); return;
      case "pickDataset": return this.pickDataset();
      case "trainStart": return this.trainStart(m.settings);
      case "trainCancel": return this.trainCancel(m.jobId);
      case "trainResume": return this.trainResume(m.jobId);
      case "chat": return this.chatAsk(m.chatId, m.messages, m.adapter, m.scale);
      case "chatStop": for (const c of this.chats.values()) c.cancel(); return;
      case "export": return this.export(m.adapter, m.format);
      case "openSettings": void vscode.commands.executeCommand("workbench.action.openSettings", m.setting); return;
    }
  }

  private async onReady(dataset: string | null): Promise<void> {
    this.ready = true;
    const queued = this.queued.splice(0);
    this.post({ type: "daemon", state: this.ctx.state, text: this.ctx.stateText });
    for (const j of this.ctx.jobs().slice().reverse()) this.post({ type: "job", job: j });
    for (const m of queued) this.post(m);
    await this.refresh();
    if (dataset && !this.dataset && this.ctx.state === "ready") await this.useDataset(dataset);
  }

  /** Model, adapters and jobs from the daemon (on load, and when it restarted). */
  private async refresh(): Promise<void> {
    try {
      await this.model();
      await this.adapters();
      for (const j of this.ctx.jobs().slice().reverse()) this.post({ type: "job", job: j });
    } catch (e) {
      this.post({ type: "model", model: null });
      this.fail("daemon", e);
    }
  }

  private async adapters(): Promise<void> {
    try {
      const api = await this.ctx.daemon();
      this.post({ type: "adapters", adapters: (await api.request("adapter/list", undefined)).adapters });
    } catch (e) {
      this.fail("daemon", e);
    }
  }

  private planParams(m: ModelInfo, s: TrainSettings): PlanParams {
    return { model: m.id, lora: { r: s.r, alpha: 2 * s.r }, batchSize: s.batchSize, seqLen: s.seqLen, steps: s.steps,
             ...(s.budgetMinutes > 0 ? { timeBudgetSeconds: s.budgetMinutes * 60 } : {}) };
  }

  private async plan(s: TrainSettings): Promise<void> {
    this.post({ type: "planning", on: true });
    try {
      const m = await this.model();
      this.post({ type: "plan", plan: await (await this.ctx.daemon()).request("plan/estimate", this.planParams(m, s)) });
    } catch (e) {
      this.fail("plan", e);
    }
  }

  /** Time a few short steps on this device so plan/estimate can predict tokens/s and time; with progress
   * after each timed shape, and Cancel between shapes. */
  private async calibrate(s: TrainSettings): Promise<void> {
    if (this.calibration) return;
    const cts = new CancellationTokenSource();
    this.calibration = cts;
    this.post({ type: "calibration", running: true, percentage: 0, message: "starting" });
    let sub: { dispose(): void } | undefined;
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      const token = api.token("calibrate");
      sub = api.onProgress(token, (v) => {
        if (v.kind !== "end") {
          this.post({ type: "calibration", running: true, percentage: v.percentage ?? null,
                      message: v.message ?? (v.kind === "begin" ? v.title : "") });
        }
      });
      await api.request("plan/calibrate", { model: m.id, workDoneToken: token }, cts.token);
      this.post({ type: "calibration", running: false, percentage: null, message: "" });
      await this.plan(s);
    } catch (e) {
      const cancelled = describeError(e).code === ErrorCodes.RequestCancelled || cts.token.isCancellationRequested;
      this.post({ type: "calibration", running: false, percentage: null, message: cancelled ? "calibration cancelled" : "" });
      if (!cancelled) this.fail("plan", e);
    } finally {
      sub?.dispose();
      this.calibration = undefined;
      cts.dispose();
    }
  }

  private async pickDataset(): Promise<void> {
    const pick = await vscode.window.showOpenDialog({
      canSelectFiles: true, canSelectFolders: true, canSelectMany: false, openLabel: "Use as training data",
      defaultUri: vscode.workspace.workspaceFolders?.[0]?.uri,
      filters: { "Training data": ["jsonl", "txt", "md"], "All files": ["*"] },
    });
    if (pick?.[0]) await this.useDataset(pick[0].fsPath);
  }

  private async useDataset(p: string): Promise<boolean> {
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      this.dataset = await api.request("dataset/inspect", { path: p, model: m.id });
      this.post({ type: "dataset", dataset: this.dataset });
      return true;
    } catch (e) {
      this.fail("dataset", e);
      return false;
    }
  }

  private async trainStart(s: TrainSettings): Promise<void> {
    const ds = this.dataset;
    if (!ds) {
      this.post({ type: "error", section: "train", message: "pick a dataset first (JSONL, text file or folder)" });
      return;
    }
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      const validation: Partial<TrainParams> = ds.validation ? { evalAtStart: true }
        : s.valPercent > 0 ? { validationFraction: s.valPercent / 100, evalAtStart: true } : {};
      const params: Omit<TrainParams, "workDoneToken" | "wait"> = {
        model: m.id, dataset: ds.path, adapter: s.adapter, steps: s.steps, batchSize: s.batchSize, seqLen: s.seqLen,
        lora: { r: s.r, alpha: 2 * s.r }, optimizer: { lr: s.lr }, ...validation,
        ...(validation.evalAtStart && s.evalEvery > 0 ? { evalEvery: s.evalEvery } : {}),
      };
      // the plan's prediction for this run, to show beside the real time (none until calibrated)
      const predicted = await api.request("plan/estimate", this.planParams(m, s)).then((p) => p.seconds, () => null);
      await this.ctx.startTraining(params, predicted);
    } catch (e) {
      this.fail("train", e);
    }
  }

  private async trainCancel(jobId: string): Promise<void> {
    try {
      await this.ctx.cancelJob(jobId);
    } catch (e) {
      this.fail("train", e);
    }
  }

  private async trainResume(jobId: string): Promise<void> {
    try {
      await this.ctx.resumeJob(jobId);
    } catch (e) {
      this.fail("train", e);
    }
  }

  private async chatAsk(chatId: number, messages: ChatMessage[], adapter: string | null, scale: number): Promise<void> {
    const cts = new CancellationTokenSource();
    this.chats.set(chatId, cts);
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      const result = await api.generate({ model: m.id, messages, adapter, maxTokens: readConfig().maxTokens,
                                          ...(adapter !== null ? { adapterScale: scale } : {}) },
                                        (d) => this.post({ type: "delta", chatId, text: d.text }), cts.token);
      this.post({ type: "generated", chatId, result });
    } catch (e) {
      if (describeError(e).code === ErrorCodes.RequestCancelled || cts.token.isCancellationRequested) {
        this.post({ type: "chatStopped", chatId });
      } else {
        this.post({ type: "chatStopped", chatId });
        this.fail("chat", e);
      }
    } finally {
      this.chats.delete(chatId);
      cts.dispose();
    }
  }

  private async export(adapter: string, format: ExportFormat): Promise<void> {
    try {
      const result = await exportAdapter(this.ctx, adapter, format);
      if (result) this.post({ type: "exported", result });
    } catch (e) {
      this.fail("export", e);
    }
  }
}

function html(webview: vscode.Webview, script: vscode.Uri): string {
  const nonce = crypto.randomBytes(16).toString("base64");
  const csp = [`default-src 'none'`, `img-src ${webview.cspSource} data:`, `style-src ${webview.cspSource} 'unsafe-inline'`,
               `script-src 'nonce-${nonce}'`].join("; ");
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${csp}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>LoRA Lab</title></head>
<body><div id="app">Loading LoRA Lab…</div>
<script nonce="${nonce}" src="${webview.asWebviewUri(script).toString()}"></script></body></html>`;
}
