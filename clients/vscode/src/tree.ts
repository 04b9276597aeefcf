// The activity bar's LoRA Lab view: the daemon, the model, the jobs, and the commands, one click each.
import * as vscode from "vscode";
import { formatSeconds } from "./chart";
import type { Ctx } from "./ctx";
import { isRunning, percent } from "./jobs";
import type { JobView } from "./jobs";

function item(label: string, icon: string, command?: string, description?: string, tooltip?: string): vscode.TreeItem {
  const t = new vscode.TreeItem(label);
  t.iconPath = new vscode.ThemeIcon(icon);
  if (command) t.command = { command, title: label };
  if (description) t.description = description;
  if (tooltip) t.tooltip = tooltip;
  return t;
}

function jobItem(j: JobView): vscode.TreeItem {
  const running = isRunning(j);
  const what = running ? `${percent(j)}%` + (j.etaSeconds ? ` · ETA ${formatSeconds(j.etaSeconds)}` : "") : j.state;
  const t = item(j.adapter, running ? "pulse" : j.state === "completed" ? "pass" : "circle-slash", "loralab.openPanel", what,
                 `job ${j.jobId}: step ${j.step}/${j.totalSteps}` + (j.loss !== null ? `, loss ${j.loss.toFixed(4)}` : ""));
  t.contextValue = running ? "runningJob" : "job";
  return t;
}

export class OverviewTree implements vscode.TreeDataProvider<vscode.TreeItem>, vscode.Disposable {
  private readonly changed = new vscode.EventEmitter<void>();
  readonly onDidChangeTreeData = this.changed.event;
  private readonly subs: vscode.Disposable[];

  constructor(private readonly ctx: Ctx) {
    const fire = (): void => this.changed.fire();
    this.subs = [ctx.onDidChangeState(fire), ctx.onDidChangeJob(fire), ctx.onDidChangeModel(fire)];
  }

  dispose(): void {
    for (const s of this.subs) s.dispose();
    this.changed.dispose();
  }

  getTreeItem(e: vscode.TreeItem): vscode.TreeItem {
    return e;
  }

  getChildren(): vscode.TreeItem[] {
    const c = this.ctx;
    const daemon = c.state === "ready" ? item("Daemon", "beaker", "loralab.showLog", c.stateText)
      : c.state === "starting" ? item("Daemon", "sync~spin", "loralab.showLog", c.stateText)
      : c.state === "failed" ? item("Daemon", "error", "loralab.showLog", "failed — see the log", c.stateText)
      : item("Daemon", "circle-slash", "loralab.openPanel", "not running — open the panel to start it");
    const jobs = c.jobs().slice(0, 5).map(jobItem);
    return [
      daemon,
      ...jobs,
      item("Open Panel", "window", "loralab.openPanel"),
      item("Plan a Run", "graph", "loralab.plan"),
      item("Train on a File…", "play", "loralab.train"),
      item("Chat…", "comment-discussion", "loralab.chat"),
      item("Export an Adapter…", "export", "loralab.export"),
      ...(c.jobs().some(isRunning) ? [item("Cancel Training", "debug-stop", "loralab.cancelTraining")] : []),
    ];
  }
}
