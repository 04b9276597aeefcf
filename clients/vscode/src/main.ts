// Activation: the status bar item and the activity bar view exist from startup (a running daemon is
// attached to at once, so its jobs show); the commands; the panel's serializer for reloads.
import * as vscode from "vscode";
import { cancelTraining, exportAdapter, pickTrainingData } from "./actions";
import { describeError } from "./api";
import { Ctx } from "./ctx";
import { Panel, VIEW_TYPE } from "./panel";
import { OverviewTree } from "./tree";

let ctx: Ctx | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const c = new Ctx(context);
  ctx = c;
  const uri = context.extensionUri;
  const tree = new OverviewTree(c);
  const train = async (file?: vscode.Uri): Promise<void> => {
    const pick = await pickTrainingData(file instanceof vscode.Uri ? file : undefined);
    if (pick) await Panel.show(c, uri).trainOn(pick.uri, pick.adapter);
  };
  const guarded = (what: string, f: (...args: never[]) => Promise<unknown>) => async (...args: never[]): Promise<void> => {
    try {
      await f(...args);
    } catch (e) {
      if (c.state === "failed") return;  // the start failure has its notification already
      void vscode.window.showErrorMessage(`LoRA Lab: ${what} failed: ${describeError(e).message}`, "Show Log")
        .then((a) => { if (a) c.showLog(); });
    }
  };
  context.subscriptions.push(
    c, tree,
    vscode.window.registerTreeDataProvider("loralab.overview", tree),
    vscode.commands.registerCommand("loralab.openPanel", () => { Panel.show(c, uri); }),
    vscode.commands.registerCommand("loralab.plan", () => Panel.show(c, uri).run("plan")),
    vscode.commands.registerCommand("loralab.train", guarded("training", () => train())),
    vscode.commands.registerCommand("loralab.trainOnFile", guarded("training", (file?: vscode.Uri) => train(file))),
    vscode.commands.registerCommand("loralab.chat", async () => {
      const prompt = await vscode.window.showInputBox({ title: "LoRA Lab: chat", prompt: "Ask the base model and the adapters" });
      if (prompt) Panel.show(c, uri).ask(prompt);
    }),
    vscode.commands.registerCommand("loralab.export", guarded("export", () => exportAdapter(c))),
    vscode.commands.registerCommand("loralab.cancelTraining", guarded("cancel", () => cancelTraining(c))),
    vscode.commands.registerCommand("loralab.restartDaemon", guarded("restart", () => c.restart())),
    vscode.commands.registerCommand("loralab.stopDaemon", guarded("stop", () => c.stop(true))),
    vscode.commands.registerCommand("loralab.showLog", () => c.showLog()),
    vscode.window.registerWebviewPanelSerializer(VIEW_TYPE, {
      deserializeWebviewPanel: async (panel: vscode.WebviewPanel) => Panel.revive(panel, c, uri),
    }),
  );
  c.attachIfRunning();
}

export async function deactivate(): Promise<void> {
  await ctx?.shutdown();  // our idle daemon stops; one with a running job goes on, for the next window to follow
  ctx = undefined;
}
