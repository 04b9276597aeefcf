// Typed calls to the daemon over any RawConnection, with streaming routed by token.
// vscode-jsonrpc keeps one handler per notification method, so generate/delta is routed here by token.
import type { CancellationToken, Disposable } from "vscode-jsonrpc";
import { generateDelta, workDoneProgress } from "./lsp_ext";
import type { Params, RawConnection, Result, WorkDoneValue } from "./lsp_ext";
import type { GenerateDelta, GenerateParams, GenerateResult, JobInfo, RequestMethod, TrainParams } from "./protocol";

export class DaemonApi {
  private readonly deltas = new Map<string, (d: GenerateDelta) => void>();
  private readonly sub: Disposable;
  private seq = 0;

  constructor(private readonly conn: RawConnection) {
    this.sub = conn.onNotification(generateDelta, (d) => this.deltas.get(String(d.token))?.(d));
  }

  dispose(): void {
    this.sub.dispose();
    this.deltas.clear();
  }

  request<M extends RequestMethod>(method: M, params: Params<M>, token?: CancellationToken): Promise<Result<M>> {
    // vscode-jsonrpc counts every argument: an undefined token or params would go out as a params array.
    if (params === undefined) {
      return token ? this.conn.sendRequest<Result<M>>(method, token) : this.conn.sendRequest<Result<M>>(method);
    }
    return token ? this.conn.sendRequest<Result<M>>(method, params, token) : this.conn.sendRequest<Result<M>>(method, params);
  }

  /** generate with streaming: onDelta gets the text as it comes, in order; resolves with the whole result. */
  async generate(params: Omit<GenerateParams, "partialResultToken">, onDelta: (d: GenerateDelta) => void,
                 token?: CancellationToken): Promise<GenerateResult> {
    const t = this.token("gen");
    this.deltas.set(t, onDelta);
    try {
      return await this.request("generate", { ...params, partialResultToken: t }, token);
    } finally {
      this.deltas.delete(t);
    }
  }

  /** A token for a request's progress or stream, unique in this client. */
  token(kind: string): string {
    return `${kind}-${process.pid}-${++this.seq}`;
  }

  /** $/progress on token: begin, reports (coalesced, ~4/s) and end. */
  onProgress(token: string, handler: (v: WorkDoneValue) => void): Disposable {
    return this.conn.onProgress(workDoneProgress, token, handler);
  }

  /** train/start with $/progress: onProgress gets begin, reports (coalesced, ~4/s) and end. */
  async train(params: Omit<TrainParams, "workDoneToken">, onProgress: (v: WorkDoneValue) => void,
              token?: CancellationToken): Promise<JobInfo> {
    const t = this.token("train");
    const sub = this.onProgress(t, onProgress);
    try {
      return await this.request("train/start", { ...params, workDoneToken: t }, token);
    } finally {
      sub.dispose();
    }
  }
}

export interface DaemonError {
  code: number | null;  // JSON-RPC / LoRA Lab code (protocol.ts ErrorCodes), null for transport errors
  message: string;      // what went wrong and what to do (the daemon's own words)
}

/** A daemon error reply (vscode-jsonrpc's ResponseError) or any other failure, as code + message. */
export function describeError(e: unknown): DaemonError {
  if (typeof e === "object" && e !== null) {
    const o = e as { code?: unknown; message?: unknown; data?: unknown };
    const code = typeof o.code === "number" ? o.code : null;
    let message = typeof o.message === "string" ? o.message : String(e);
    const hint = typeof o.data === "object" && o.data !== null ? (o.data as { hint?: unknown }).hint : undefined;
    if (typeof hint === "string" && !message.includes(hint)) message += ` (${hint})`;
    return { code, message };
  }
  return { code: null, message: String(e) };
}
