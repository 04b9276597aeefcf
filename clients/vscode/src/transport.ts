// JSON-RPC over the daemon's websocket as vscode-jsonrpc reader/writer, for attaching to a running daemon.
// An attached client shares the daemon with others (the CLI, other windows), so LSP's shutdown/exit
// must not stop it: `shutdown` is answered here, `exit` is dropped, and end() closes this socket.
// A close we asked for is not reported as a lost connection (vscode-languageclient would show an error).
import {
  AbstractMessageReader, AbstractMessageWriter, DataCallback, Disposable, Message, MessageReader, MessageWriter,
  NotificationMessage, RequestMessage,
} from "vscode-jsonrpc";
import { WsClient } from "./ws";
import type { ConnectionInfo } from "./daemon";

class WsReader extends AbstractMessageReader implements MessageReader {
  private cb: DataCallback | undefined;
  private queue: Message[] = [];  // messages that arrive before listen()

  listen(callback: DataCallback): Disposable {
    this.cb = callback;
    for (const m of this.queue.splice(0)) callback(m);
    return Disposable.create(() => { this.cb = undefined; });
  }

  push(m: Message): void {
    if (this.cb) this.cb(m); else this.queue.push(m);
  }

  error(e: Error): void { this.fireError(e); }
  closed(): void { this.fireClose(); }
}

class WsWriter extends AbstractMessageWriter implements MessageWriter {
  detaching = false;

  constructor(private readonly ws: () => WsClient | undefined, private readonly reader: WsReader) {
    super();
  }

  async write(msg: Message): Promise<void> {
    const ws = this.ws();
    const req = msg as RequestMessage;
    if (req.method === "shutdown" && req.id !== undefined) {  // detach, never stop a shared daemon
      this.reader.push({ jsonrpc: "2.0", id: req.id, result: null } as Message);
      return;
    }
    if ((msg as NotificationMessage).method === "exit" && req.id === undefined) {
      this.detaching = true;  // end() follows and closes the socket
      return;
    }
    try {
      if (!ws || ws.isClosed) throw new Error("the daemon's websocket is closed");
      ws.send(JSON.stringify(msg));
    } catch (e) {
      this.fireError(e, msg, 1);
      throw e;
    }
  }

  end(): void {
    this.detaching = true;
    this.ws()?.close(1000, "client detached");
  }

  error(e: Error): void { this.fireError(e); }
  closed(): void { this.fireClose(); }
}

export interface WsTransports {
  reader: MessageReader;
  writer: MessageWriter;
  detached: boolean;
  isClosed(): boolean;
}

/** Connect to a running websocket daemon described by its connection file. */
export async function attachWebSocket(info: ConnectionInfo): Promise<WsTransports> {
  let ws: WsClient | undefined;
  const reader = new WsReader();
  const writer = new WsWriter(() => ws, reader);
  ws = await WsClient.connect(info.url, { Authorization: `Bearer ${info.token}` }, {
    message: (text) => {
      try {
        reader.push(JSON.parse(text) as Message);
      } catch (e) {
        reader.error(new Error(`the daemon sent invalid JSON: ${String(e)}`));
      }
    },
    close: () => {
      if (!writer.detaching) { reader.closed(); writer.closed(); }
    },
    error: (e) => reader.error(e),
  });
  return { reader, writer, detached: true, isClosed: () => ws?.isClosed ?? true };
}
