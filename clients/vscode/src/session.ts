// One connection to a running daemon over its websocket: vscode-jsonrpc on the extension's own RFC 6455
// transport, the LSP handshake, and a typed DaemonApi. No vscode import: the node tests open sessions too.
import { createMessageConnection } from "vscode-jsonrpc/node";
import type { MessageConnection } from "vscode-jsonrpc/node";
import { DaemonApi } from "./api";
import type { ConnectionInfo } from "./daemon";
import { PROTOCOL_VERSION } from "./protocol";
import type { InitializeResult } from "./protocol";
import { attachWebSocket } from "./transport";

export interface Session {
  api: DaemonApi;
  init: InitializeResult;
  info: ConnectionInfo;
  /** Detach: close this socket; the daemon and its jobs keep running. */
  close(): void;
  /** Called once when the connection ends without close() (the daemon went away). */
  onLost(cb: (why: string) => void): void;
}

const major = (v: string): string => v.split(".")[0];

export async function openSession(info: ConnectionInfo, client: { name: string; version: string }): Promise<Session> {
  const t = await attachWebSocket(info);
  const conn: MessageConnection = createMessageConnection(t.reader, t.writer);
  let closing = false, lost: ((why: string) => void) | undefined, why = "";
  const end = (w: string): void => {
    if (closing) return;
    closing = true;
    why = w;
    lost?.(w);
  };
  conn.onClose(() => end("the daemon closed the connection"));
  conn.onError(([e]) => { if (t.isClosed()) end(e.message); });
  conn.listen();
  const api = new DaemonApi(conn);
  const close = (): void => {
    closing = true;
    api.dispose();
    conn.dispose();
    t.writer.end();
  };
  let init: InitializeResult;
  try {
    init = await api.request("initialize", { processId: process.pid, clientInfo: client });
  } catch (e) {
    close();
    throw e;
  }
  if (major(init.loralab.protocolVersion) !== major(PROTOCOL_VERSION)) {
    close();
    throw new Error(`the daemon speaks protocol ${init.loralab.protocolVersion}, this extension ${PROTOCOL_VERSION}: ` +
      "update the extension or LoRA Lab so that they match, then restart the daemon");
  }
  void conn.sendNotification("initialized", {});
  return {
    api, init, info, close,
    onLost: (cb) => {
      if (closing && why) cb(why); else lost = cb;
    },
  };
}
