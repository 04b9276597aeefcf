// The daemon's messages, typed from the generated protocol.ts (like rust-analyzer's lsp_ext.ts).
// Imports vscode-jsonrpc only (no vscode), so the same types drive a bare connection in the node tests.
import { NotificationType, ProgressType } from "vscode-jsonrpc";
import type { CancellationToken, Disposable } from "vscode-jsonrpc";
import type { GenerateDelta, ProgressParams, RequestMethod, Requests } from "./protocol";

export type Params<M extends RequestMethod> = Requests[M]["params"];
export type Result<M extends RequestMethod> = Requests[M]["result"];
/** begin | report | end of a request that named a workDoneToken. */
export type WorkDoneValue = ProgressParams["value"];

/** `generate/delta`: streamed text on a generate request's partialResultToken. */
export const generateDelta = new NotificationType<GenerateDelta>("generate/delta");
/** `$/progress` values on a workDoneToken (train/start, train/resume). */
export const workDoneProgress = new ProgressType<WorkDoneValue>();

/** What both vscode-languageclient's LanguageClient and a bare vscode-jsonrpc MessageConnection offer. */
export interface RawConnection {
  sendRequest<R>(method: string, token?: CancellationToken): Promise<R>;
  sendRequest<R>(method: string, param: unknown, token?: CancellationToken): Promise<R>;
  onNotification<P>(type: NotificationType<P>, handler: (params: P) => void): Disposable;
  onProgress<P>(type: ProgressType<P>, token: string | number, handler: (params: P) => void): Disposable;
}
