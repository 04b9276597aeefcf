// The LoRA Lab panel, extension side: a webview (dist/webview.js renders it) whose messages become
// daemon requests. One panel at a time; what it shows lives in state.ts, folded from ToPanel messages.
import * as crypto from "crypto";
import * as vscode from "vscode";
import { CancellationTokenSource } from "vscode-languageclient/node";
import { describeError } from "./api";
import type { Ctx } from "./ctx";
import { isFromPanel } from "./messages";
import type { FromPanel, Section, ToPanel, TrainSettings } from "./messages";
import { DEFAULTS, ErrorCodes } from "./protocol";
import type { ChatMessage, ExportFormat, ModelInfo, PlanParams } from "./protocol";

export const VIEW_TYPE = "loralab.panel";

export class Panel implements vscode.Disposable {
  private static current: Panel | undefined;
  private readonly subs: vscode.Disposable[] = [];
  private datasetPath: string | undefined;
  private train: CancellationTokenSource | undefined;
  private chat: CancellationTokenSource | undefined;

  static show(ctx: Ctx, extensionUri: vscode.Uri): void {
    if (Panel.current) {
      Panel.current.panel.reveal();
      return;
    }
    const panel = vscode.window.createWebviewPanel(VIEW_TYPE, "LoRA Lab", vscode.ViewColumn.Active, {
      enableScripts: true, retainContextWhenHidden: true,
      localResourceRoots: [vscode.Uri.joinPath(extensionUri, "dist")],
    });
    Panel.current = new Panel(panel, ctx, extensionUri);
  }

  /** A panel VS Code restores after a reload. */
  static revive(panel: vscode.WebviewPanel, ctx: Ctx, extensionUri: vscode.Uri): void {
    Panel.current?.dispose();
    Panel.current = new Panel(panel, ctx, extensionUri);
  }

  private constructor(private readonly panel: vscode.WebviewPanel, private readonly ctx: Ctx, extensionUri: vscode.Uri) {
    panel.webview.options = { enableScripts: true, localResourceRoots: [vscode.Uri.joinPath(extensionUri, "dist")] };
    panel.webview.html = html(panel.webview, vscode.Uri.joinPath(extensionUri, "dist", "webview.js"));
    this.subs.push(
      panel.onDidDispose(() => this.dispose()),
      panel.webview.onDidReceiveMessage((m: unknown) => {
        if (isFromPanel(m)) void this.handle(m);
        else ctx.output.appendLine(`LoRA Lab: ignored a malformed panel message: ${JSON.stringify(m).slice(0, 200)}`);
      }),
      ctx.onDidChangeState((s) => this.post({ type: "daemon", state: s.state, text: s.text })),
    );
  }

  dispose(): void {
    if (Panel.current === this) Panel.current = undefined;
    this.chat?.cancel();  // a running training job keeps going in the daemon; only the view goes
    for (const s of this.subs.splice(0)) s.dispose();
    this.panel.dispose();
  }

  private post(m: ToPanel): void {
    void this.panel.webview.postMessage(m);
  }

  private fail(section: Section, e: unknown): void {
    this.post({ type: "error", section, message: describeError(e).message });
  }

  private async model(): Promise<ModelInfo> {
    const m = await this.ctx.ensureModel();
    this.post({ type: "model", model: m });
    return m;
  }

  private async handle(m: FromPanel): Promise<void> {
    switch (m.type) {
      case "ready": return this.ready();
      case "plan": return this.plan(m.settings);
      case "calibrate": return this.calibrate(m.settings);
      case "pickDataset": return this.pickDataset();
      case "trainStart": return this.trainStart(m.settings);
      case "trainCancel": this.train?.cancel(); return;
      case "chat": return this.chatAsk(m.chatId, m.messages, m.adapter);
      case "chatStop": this.chat?.cancel(); return;
      case "export": return this.export(m.adapter, m.format);
    }
  }

  private async ready(): Promise<void> {
    try {
      await this.model();
      const api = await this.ctx.daemon();
      this.post({ type: "adapters", adapters: (await api.request("adapter/list", undefined)).adapters });
    } catch (e) {
      this.fail("daemon", e);
    }
  }

  private async plan(s: TrainSettings): Promise<void> {
    try {
      const m = await this.model();
      const params: PlanParams = { model: m.id, lora: { r: s.r, alpha: 2 * s.r }, batchSize: s.batchSize,
                                   seqLen: s.seqLen, steps: s.steps };
      this.post({ type: "plan", plan: await (await this.ctx.daemon()).request("plan/estimate", params) });
    } catch (e) {
      this.fail("plan", e);
    }
  }

  /** Time a few short steps on this device so plan/estimate can predict tokens/s and time. */
  private async calibrate(s: TrainSettings): Promise<void> {
    this.post({ type: "calibrating", on: true });
    try {
      const m = await this.model();
      await (await this.ctx.daemon()).request("plan/calibrate", { model: m.id });
    } catch (e) {
      this.fail("plan", e);
    } finally {
      this.post({ type: "calibrating", on: false });
    }
    await this.plan(s);
  }

  private async pickDataset(): Promise<void> {
    const pick = await vscode.window.showOpenDialog({
      canSelectFiles: true, canSelectFolders: true, canSelectMany: false, openLabel: "Use as training data",
      filters: { "Training data": ["jsonl", "txt", "md"], "All files": ["*"] },
    });
    if (!pick?.[0]) return;
    this.datasetPath = pick[0].fsPath;
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      this.post({ type: "dataset", dataset: await api.request("dataset/inspect", { path: this.datasetPath, model: m.id }) });
    } catch (e) {
      this.fail("dataset", e);
    }
  }

  private async trainStart(s: TrainSettings): Promise<void> {
    if (!this.datasetPath) {
      this.post({ type: "error", section: "train", message: "pick a dataset first (JSONL, text file or folder)" });
      return;
    }
    if (this.train) {
      this.post({ type: "error", section: "train", message: "a job is already running from this panel; cancel it first" });
      return;
    }
    const cts = new CancellationTokenSource();
    this.train = cts;
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      const job = await api.train({
        model: m.id, dataset: this.datasetPath, adapter: s.adapter, steps: s.steps, batchSize: s.batchSize,
        seqLen: s.seqLen, lora: { r: s.r, alpha: 2 * s.r }, optimizer: { lr: s.lr },
      }, (value) => this.post({ type: "progress", value }), cts.token);
      this.post({ type: "trainDone", job });
      this.post({ type: "adapters", adapters: (await api.request("adapter/list", undefined)).adapters });
    } catch (e) {
      if (describeError(e).code === ErrorCodes.RequestCancelled || cts.token.isCancellationRequested) {
        this.post({ type: "trainCancelled" });
      } else {
        this.fail("train", e);
      }
    } finally {
      this.train = undefined;
      cts.dispose();
    }
  }

  private async chatAsk(chatId: number, messages: ChatMessage[], adapter: string | null): Promise<void> {
    this.chat?.cancel();
    const cts = new CancellationTokenSource();
    this.chat = cts;
    try {
      const m = await this.model();
      const api = await this.ctx.daemon();
      const result = await api.generate({ model: m.id, messages, adapter, maxTokens: DEFAULTS.GenerateParams.maxTokens },
                                        (d) => this.post({ type: "delta", chatId, text: d.text }), cts.token);
      this.post({ type: "generated", chatId, result });
    } catch (e) {
      if (describeError(e).code === ErrorCodes.RequestCancelled || cts.token.isCancellationRequested) {
        this.post({ type: "chatStopped", chatId });
      } else {
        this.fail("chat", e);
      }
    } finally {
      if (this.chat === cts) this.chat = undefined;
      cts.dispose();
    }
  }

  private async export(adapter: string, format: ExportFormat): Promise<void> {
    try {
      const api = await this.ctx.daemon();
      const result = await api.request("adapter/export", { adapter, format });
      this.post({ type: "exported", result });
      const reveal = await vscode.window.showInformationMessage(`LoRA Lab: exported ${adapter} as ${format} to ${result.path}`,
                                                               "Reveal");
      if (reveal) await vscode.commands.executeCommand("revealFileInOS", vscode.Uri.file(result.path));
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
