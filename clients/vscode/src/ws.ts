// A minimal RFC 6455 websocket client (text frames, ping/pong, close) over node's http upgrade.
// Why not a package: the extension keeps one runtime dependency, and VS Code 1.85's extension host
// (Node 18) has no global WebSocket. The daemon sends one JSON-RPC message per text frame.
import * as crypto from "crypto";
import * as http from "http";
import type { Socket } from "net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const OP_CONT = 0x0, OP_TEXT = 0x1, OP_BIN = 0x2, OP_CLOSE = 0x8, OP_PING = 0x9, OP_PONG = 0xa;

export interface WsHandlers {
  message(text: string): void;
  close(code: number, reason: string): void;
  error(err: Error): void;
}

export class WsClient {
  private buf: Buffer = Buffer.alloc(0);
  private parts: Buffer[] = [];  // fragments of a message in progress
  private closed = false;

  private constructor(private readonly sock: Socket, private readonly h: WsHandlers, head: Buffer) {
    sock.setNoDelay(true);
    sock.on("data", (d: Buffer) => this.onData(d));
    sock.on("error", (e: Error) => this.h.error(e));
    sock.on("close", () => this.finish(1006, "connection lost"));
    if (head.length > 0) this.onData(head);
  }

  /** Open ws://host:port/path with extra headers (the daemon's token goes in Authorization). */
  static connect(url: string, headers: Record<string, string>, h: WsHandlers, timeoutMs = 10000): Promise<WsClient> {
    const u = new URL(url);
    if (u.protocol !== "ws:") return Promise.reject(new Error(`only ws:// URLs are supported, got ${url}`));
    const key = crypto.randomBytes(16).toString("base64");
    return new Promise((resolve, reject) => {
      const req = http.request({
        host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port || 80), path: u.pathname + u.search,
        timeout: timeoutMs,
        headers: { ...headers, Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": key },
      });
      req.on("upgrade", (res, sock: Socket, head: Buffer) => {
        const want = crypto.createHash("sha1").update(key + GUID).digest("base64");
        if (res.headers["sec-websocket-accept"] !== want) {
          sock.destroy();
          reject(new Error(`websocket handshake with ${url} failed: bad Sec-WebSocket-Accept`));
          return;
        }
        sock.setTimeout(0);
        resolve(new WsClient(sock, h, head));
      });
      req.on("response", (res) => {
        res.resume();
        reject(new Error(`websocket upgrade to ${url} refused: HTTP ${res.statusCode}` +
          (res.statusCode === 401 ? " (wrong token: the connection file is stale; restart the daemon)" : "")));
      });
      req.on("timeout", () => req.destroy(new Error(`websocket connect to ${url} timed out`)));
      req.on("error", reject);
      req.end();
    });
  }

  send(text: string): void {
    this.frame(OP_TEXT, Buffer.from(text, "utf8"));
  }

  close(code = 1000, reason = ""): void {
    if (this.closed) return;
    const r = Buffer.from(reason, "utf8");
    const p = Buffer.alloc(2 + r.length);
    p.writeUInt16BE(code, 0);
    r.copy(p, 2);
    this.frame(OP_CLOSE, p);
    this.sock.end();
    this.finish(code, reason);
  }

  get isClosed(): boolean {
    return this.closed;
  }

  private finish(code: number, reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.h.close(code, reason);
  }

  private frame(op: number, payload: Buffer): void {  // client frames are always masked
    if (this.closed || this.sock.destroyed) throw new Error("websocket is closed");
    const n = payload.length;
    const ext = n < 126 ? 0 : n < 65536 ? 2 : 8;
    const head = Buffer.alloc(2 + ext + 4);
    head[0] = 0x80 | op;
    head[1] = 0x80 | (ext === 0 ? n : ext === 2 ? 126 : 127);
    if (ext === 2) head.writeUInt16BE(n, 2);
    if (ext === 8) head.writeBigUInt64BE(BigInt(n), 2);
    const mask = crypto.randomBytes(4);
    mask.copy(head, 2 + ext);
    const body = Buffer.alloc(n);
    for (let i = 0; i < n; i++) body[i] = payload[i] ^ mask[i & 3];
    this.sock.write(Buffer.concat([head, body]));
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    for (;;) {
      if (this.buf.length < 2) return;
      const b0 = this.buf[0], b1 = this.buf[1];
      let n = b1 & 0x7f, off = 2;
      if (n === 126) {
        if (this.buf.length < 4) return;
        n = this.buf.readUInt16BE(2); off = 4;
      } else if (n === 127) {
        if (this.buf.length < 10) return;
        n = Number(this.buf.readBigUInt64BE(2)); off = 10;
      }
      const masked = (b1 & 0x80) !== 0;  // servers must not mask, but accept it
      const end = off + (masked ? 4 : 0) + n;
      if (this.buf.length < end) return;
      let payload = this.buf.subarray(off + (masked ? 4 : 0), end);
      if (masked) {
        const m = this.buf.subarray(off, off + 4);
        payload = Buffer.from(payload.map((x, i) => x ^ m[i & 3]));
      }
      this.buf = this.buf.subarray(end);
      this.onFrame((b0 & 0x80) !== 0, b0 & 0x0f, payload);
    }
  }

  private onFrame(fin: boolean, op: number, payload: Buffer): void {
    if (op === OP_PING) { this.frame(OP_PONG, payload); return; }
    if (op === OP_PONG) return;
    if (op === OP_CLOSE) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      const reason = payload.subarray(2).toString("utf8");
      if (!this.closed) {
        try { this.frame(OP_CLOSE, payload.subarray(0, 2)); } catch { /* socket already gone */ }
      }
      this.sock.end();
      this.finish(code, reason);
      return;
    }
    if (op === OP_TEXT || op === OP_BIN || op === OP_CONT) {
      this.parts.push(payload);
      if (fin) {
        const text = Buffer.concat(this.parts).toString("utf8");
        this.parts = [];
        this.h.message(text);
      }
    }
  }
}
