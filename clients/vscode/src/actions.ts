// The palette commands' flows that are more than opening the panel: export (with a folder of the user's
// choice), train on a file from the explorer, cancel a running job.
import * as os from "os";
import * as path from "path";
import * as vscode from "vscode";
import { describeError } from "./api";
import type { Ctx } from "./ctx";
import { isRunning } from "./jobs";
import type { ExportFormat, ExportResult } from "./protocol";

const FORMATS: Array<{ format: ExportFormat; label: string; detail: string }> = [
  { format: "peft", label: "PEFT", detail: "a folder PeftModel.from_pretrained loads" },
  { format: "gguf", label: "GGUF", detail: "one file for llama.cpp's --lora" },
  { format: "mlx", label: "MLX", detail: "a folder for mlx-lm's --adapter-path" },
];

function workspaceRoot(): vscode.Uri | undefined {
  return vscode.workspace.workspaceFolders?.[0]?.uri;
}

function inWorkspace(p: string): boolean {
  return (vscode.workspace.workspaceFolders ?? []).some((f) => !path.relative(f.uri.fsPath, p).startsWith(".."));
}

/** Ask for the adapter and format when not given, then where to write it; export; say where it went with
 * the actions that work here (the OS file manager only on a local desktop). Undefined: the user cancelled. */
export async function exportAdapter(ctx: Ctx, adapter?: string, format?: ExportFormat): Promise<ExportResult | undefined> {
  const api = await ctx.daemon();
  if (!adapter) {
    const { adapters } = await api.request("adapter/list", undefined);
    if (adapters.length === 0) throw new Error("no adapter to export yet: train one first");
    adapter = (await vscode.window.showQuickPick(adapters.map((a) => ({ label: a.name, description: `r=${a.r}, ${a.steps} steps` })),
                                                 { title: "LoRA Lab: export which adapter?" }))?.label;
    if (!adapter) return undefined;
  }
  if (!format) {
    format = (await vscode.window.showQuickPick(FORMATS, { title: `LoRA Lab: export ${adapter} as` }))?.format;
    if (!format) return undefined;
  }
  const label = FORMATS.find((f) => f.format === format)?.label ?? format;
  const name = format === "gguf" ? `${adapter}.gguf` : `${adapter}-${format}`;
  const base = workspaceRoot() ?? vscode.Uri.file(os.homedir());
  const uri = await vscode.window.showSaveDialog({
    defaultUri: vscode.Uri.joinPath(base, name), saveLabel: "Export here", title: `Export ${adapter} as ${label}`,
    ...(format === "gguf" ? { filters: { GGUF: ["gguf"] } } : {}),
  });
  if (!uri) return undefined;
  // the save dialog asked before replacing; the daemon still refuses a link, a device, or a folder of other files
  const result = await api.request("adapter/export", { adapter, format, path: uri.fsPath, overwrite: true });
  void announce(adapter, label, result);
  return result;
}

async function announce(adapter: string, label: string, r: ExportResult): Promise<void> {
  const actions: string[] = [];
  if (inWorkspace(r.path)) actions.push("Show in Explorer");
  if (vscode.env.uiKind === vscode.UIKind.Desktop && vscode.env.remoteName === undefined) actions.push("Reveal in File Manager");
  actions.push("Copy Path");
  const a = await vscode.window.showInformationMessage(
    `LoRA Lab: exported ${adapter} as ${label} to ${r.path} (${r.files.length} file${r.files.length === 1 ? "" : "s"})`, ...actions);
  const uri = vscode.Uri.file(r.path);
  if (a === "Show in Explorer") await vscode.commands.executeCommand("revealInExplorer", uri);
  else if (a === "Reveal in File Manager") await vscode.commands.executeCommand("revealFileInOS", uri);
  else if (a === "Copy Path") await vscode.env.clipboard.writeText(r.path);
}

/** An adapter name from a file name: letters, digits, . _ - (what the daemon accepts). */
export function adapterName(file: string): string {
  const stem = path.basename(file).replace(/\.(jsonl|json|txt|md)$/i, "");
  return stem.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-.]+|[-.]+$/g, "") || "my-adapter";
}

/** The explorer's "Train on This File" (or the palette's, which asks for the file): the adapter's name, then
 * the panel trains on it. */
export async function pickTrainingData(uri: vscode.Uri | undefined): Promise<{ uri: vscode.Uri; adapter: string } | undefined> {
  if (!uri) {
    uri = (await vscode.window.showOpenDialog({ canSelectFiles: true, canSelectFolders: true, canSelectMany: false,
                                                openLabel: "Train on this", defaultUri: workspaceRoot(),
                                                filters: { "Training data": ["jsonl", "txt", "md"], "All files": ["*"] } }))?.[0];
    if (!uri) return undefined;
  }
  const adapter = await vscode.window.showInputBox({
    title: `LoRA Lab: train on ${path.basename(uri.fsPath)}`, prompt: "Name of the adapter to train",
    value: adapterName(uri.fsPath),
    validateInput: (v) => /^[A-Za-z0-9._-]+$/.test(v) ? undefined : "letters, digits, . _ - only",
  });
  return adapter ? { uri, adapter } : undefined;
}

/** Cancel a running job (asks which when several run): it stops after its current step, checkpointed. */
export async function cancelTraining(ctx: Ctx): Promise<void> {
  await ctx.daemon();
  const running = ctx.jobs().filter(isRunning);
  if (running.length === 0) {
    void vscode.window.showInformationMessage("LoRA Lab: no training job is running.");
    return;
  }
  const job = running.length === 1 ? running[0] : (await vscode.window.showQuickPick(
    running.map((j) => ({ label: j.adapter, description: `job ${j.jobId}, step ${j.step}/${j.totalSteps}`, job: j })),
    { title: "LoRA Lab: cancel which job?" }))?.job;
  if (!job) return;
  try {
    await ctx.cancelJob(job.jobId);
    const after = ctx.jobs().find((j) => j.jobId === job.jobId) ?? job;
    const a = await vscode.window.showInformationMessage(`LoRA Lab: job ${job.jobId} (${job.adapter}) ${after.state} at ` +
      `step ${after.step}/${after.totalSteps}, checkpointed.`, ...(after.resumable ? ["Resume"] : []));
    if (a === "Resume") await ctx.resumeJob(job.jobId);
  } catch (e) {
    void vscode.window.showErrorMessage(`LoRA Lab: cancelling job ${job.jobId} failed: ${describeError(e).message}`, "Show Log")
      .then((a) => { if (a) ctx.showLog(); });
  }
}
