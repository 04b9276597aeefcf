// Activation only: everything else lives in Ctx (the daemon connection) and Panel (the webview).
import * as vscode from "vscode";
import { Ctx } from "./ctx";
import { Panel, VIEW_TYPE } from "./panel";

let ctx: Ctx | undefined;

export function activate(context: vscode.ExtensionContext): void {
  const c = new Ctx();
  ctx = c;
  context.subscriptions.push(
    c,
    vscode.commands.registerCommand("loralab.openPanel", () => Panel.show(c, context.extensionUri)),
    vscode.commands.registerCommand("loralab.restartDaemon", async () => {
      try {
        await c.restart();
      } catch (e) {
        void vscode.window.showErrorMessage(`LoRA Lab: ${e instanceof Error ? e.message : String(e)}`);
      }
    }),
    vscode.commands.registerCommand("loralab.showLog", () => c.output.show()),
    vscode.window.registerWebviewPanelSerializer(VIEW_TYPE, {
      deserializeWebviewPanel: async (panel: vscode.WebviewPanel) => Panel.revive(panel, c, context.extensionUri),
    }),
  );
}

export async function deactivate(): Promise<void> {
  await ctx?.stop();  // stdio daemon: shutdown + exit (jobs checkpoint); attached: just detach
  ctx = undefined;
}
