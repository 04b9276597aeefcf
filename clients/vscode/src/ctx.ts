// The one owner of the daemon connection (rust-analyzer's Ctx): starts `loralabd --stdio --ws` through
// vscode-languageclient, or attaches to a daemon that already runs (its connection file), keeps the
// status bar in step, and loads the configured model.
import * as cp from "child_process";
import * as os from "os";
import * as vscode from "vscode";
import { CloseAction, ErrorAction, LanguageClient, State } from "vscode-languageclient/node";
import type { LanguageClientOptions, MessageTransports, ServerOptions } from "vscode-languageclient/node";
import { DaemonApi } from "./api";
import { launchCommand, readConnection, startFailure } from "./daemon";
import type { Launch } from "./daemon";
import type { Backend, ModelInfo } from "./protocol";
import { BackendValues } from "./protocol";
import { attachWebSocket } from "./transport";

const EXIT_LOCKED = 3;  // loralabd/server/main.py: another daemon holds the data directory

export interface Config {
  pythonPath: string;
  model: string;
  backend: Backend;
}

export function readConfig(): Config {
  const c = vscode.workspace.getConfiguration("loralab");
  const backend = c.get<string>("backend", "auto");
  return {
    pythonPath: c.get<string>("pythonPath", ""),
    model: c.get<string>("model", "default") || "default",
    backend: (BackendValues as readonly string[]).includes(backend) ? backend as Backend : "auto",
  };
}

export type DaemonState = "stopped" | "starting" | "ready";

export class Ctx implements vscode.Disposable {
  readonly output = vscode.window.createOutputChannel("LoRA Lab");
  private readonly status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Left, 10);
  private readonly stateEmitter = new vscode.EventEmitter<{ state: DaemonState; text: string }>();
  readonly onDidChangeState = this.stateEmitter.event;
  private client: LanguageClient | undefined;
  private api: DaemonApi | undefined;
  private starting: Promise<DaemonApi> | undefined;
  private child: cp.ChildProcess | undefined;
  private how = "";  // "started pid N" or "attached to ws://..."
  private model: Promise<ModelInfo> | undefined;
  private modelKey = "";

  constructor() {
    this.status.command = "loralab.openPanel";
    this.setState("stopped", "not running");
    this.status.show();
  }

  /** The running daemon's API; starts or attaches on first use. */
  daemon(): Promise<DaemonApi> {
    if (this.api && this.client?.state === State.Running) return Promise.resolve(this.api);
    this.starting ??= this.start().finally(() => { this.starting = undefined; });
    return this.starting;
  }

  /** The configured model, loaded once per (model, backend) setting. */
  ensureModel(): Promise<ModelInfo> {
    const cfg = readConfig();
    const key = `${cfg.model}\u0000${cfg.backend}`;
    if (!this.model || key !== this.modelKey) {
      this.modelKey = key;
      this.model = this.daemon().then((api) => {
        this.setState("starting", `loading ${cfg.model}`);
        return api.request("model/load", { source: cfg.model, backend: cfg.backend });
      }).then((m) => {
        this.setState("ready", `${m.name} (${m.backend})`);
        return m;
      }, (e: unknown) => {
        this.model = undefined;
        this.setState("ready", "model not loaded");
        throw e;
      });
    }
    return this.model;
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.daemon();
  }

  async stop(): Promise<void> {
    const client = this.client, child = this.child;
    this.client = undefined;
    this.api?.dispose();
    this.api = undefined;
    this.model = undefined;
    this.child = undefined;
    if (client && client.state !== State.Stopped) {
      try { await client.stop(10000); } catch (e) { this.output.appendLine(`stopping the daemon: ${String(e)}`); }
    }
    if (child) await reap(child);  // else a quick restart could attach to the daemon that is still exiting
    this.setState("stopped", "stopped");
  }

  dispose(): void {
    void this.stop();
    this.status.dispose();
    this.stateEmitter.dispose();
    this.output.dispose();
  }

  private setState(state: DaemonState, text: string): void {
    const icon = state === "ready" ? "$(beaker)" : state === "starting" ? "$(sync~spin)" : "$(circle-slash)";
    this.status.text = `${icon} LoRA Lab`;
    this.status.tooltip = `LoRA Lab daemon: ${text}${this.how ? ` — ${this.how}` : ""}\nClick to open the panel.`;
    this.stateEmitter.fire({ state, text });
  }

  private async start(): Promise<DaemonApi> {
    this.setState("starting", "starting");
    const serverOptions: ServerOptions = () => this.connect();
    const clientOptions: LanguageClientOptions = {
      documentSelector: [],  // no language features: the daemon is an RPC server that speaks LSP framing
      outputChannel: this.output,
      errorHandler: {
        error: () => ({ action: ErrorAction.Continue }),
        closed: () => {
          this.api?.dispose();
          this.api = undefined;
          this.model = undefined;
          this.setState("stopped", "the daemon went away; run “LoRA Lab: Restart Daemon”");
          return { action: CloseAction.DoNotRestart, handled: true };
        },
      },
      initializationFailedHandler: () => false,
    };
    const client = new LanguageClient("loralab", "LoRA Lab", serverOptions, clientOptions);
    this.client = client;
    try {
      await client.start();
    } catch (e) {
      this.client = undefined;
      this.setState("stopped", e instanceof Error ? e.message : String(e));
      throw e;
    }
    this.api = new DaemonApi(client);
    this.setState("ready", this.how);
    return this.api;
  }

  /** Attach to the daemon of this data directory when one runs; else start one over stdio. */
  private async connect(): Promise<MessageTransports | cp.ChildProcess> {
    const info = readConnection();
    if (info) {
      this.how = `attached to ${info.url} (pid ${info.pid})`;
      this.output.appendLine(`LoRA Lab: ${this.how}`);
      const t = await attachWebSocket(info);
      return { reader: t.reader, writer: t.writer, detached: true };
    }
    const launch = launchCommand(readConfig().pythonPath);
    const child = await spawnDaemon(launch, this.output);
    this.child = child;
    this.how = `started pid ${child.pid ?? "?"} (${launch.command})`;
    this.output.appendLine(`LoRA Lab: ${this.how}`);
    return child;
  }
}

function exited(child: cp.ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once("exit", () => { clearTimeout(t); resolve(true); });
  });
}

/** Wait for a daemon we started to end after shutdown/exit; SIGTERM (jobs still checkpoint), then SIGKILL. */
async function reap(child: cp.ChildProcess): Promise<void> {
  if (await exited(child, 5000)) return;
  child.kill("SIGTERM");
  if (await exited(child, 5000)) return;
  child.kill("SIGKILL");
}

function spawnDaemon(launch: Launch, out: vscode.OutputChannel): Promise<cp.ChildProcess> {
  const cwd = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath ?? os.homedir();
  const child = cp.spawn(launch.command, launch.args, { cwd, env: process.env, stdio: ["pipe", "pipe", "pipe"] });
  child.on("exit", (code) => {
    if (code === EXIT_LOCKED) {
      void vscode.window.showErrorMessage("LoRA Lab: another daemon already uses this data directory without a " +
        "websocket to attach to. Stop it (`loralab stop`) or start it with `loralab serve`, then run " +
        "“LoRA Lab: Restart Daemon”.");
    } else if (code !== 0 && code !== null) {
      out.appendLine(`LoRA Lab: the daemon exited with code ${code}`);
    }
  });
  return new Promise((resolve, reject) => {
    child.once("spawn", () => resolve(child));
    child.once("error", (e) => {
      const msg = startFailure(launch, e.message);
      void vscode.window.showErrorMessage(msg);
      reject(new Error(msg));
    });
  });
}
