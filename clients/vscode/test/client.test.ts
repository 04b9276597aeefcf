// The extension's client code against the real daemon, over the framing the extension uses:
// vscode-jsonrpc/node (what vscode-languageclient runs on) on a `loralabd --stdio --ws` child, and the
// extension's own websocket transport attached to the same daemon. Run by tests/test_vscode_client.py,
// which makes a tiny model and passes LORALAB_PYTHON and LORALAB_TEST_MODEL; without them only the
// pure tests run.
import assert from "node:assert/strict";
import { ChildProcess, execFileSync, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { after, before, describe, it } from "node:test";
import { CancellationTokenSource, createMessageConnection, StreamMessageReader, StreamMessageWriter } from "vscode-jsonrpc/node";
import type { MessageConnection } from "vscode-jsonrpc/node";
import { DaemonApi, describeError } from "../src/api";
import { downsample, ema, layoutChart, niceTicks } from "../src/chart";
import { connectionFile, launchCommand, readConnection } from "../src/daemon";
import type { WorkDoneValue } from "../src/lsp_ext";
import { isFromPanel } from "../src/messages";
import type { ToPanel } from "../src/messages";
import { ErrorCodes, PROTOCOL_VERSION } from "../src/protocol";
import type { GenerateDelta, InitializeResult } from "../src/protocol";
import { askChat, chatHistory, initialState, reduce } from "../src/state";
import type { PanelState } from "../src/state";
import { attachWebSocket } from "../src/transport";

const REPO = path.resolve(__dirname, "..", "..", "..", "..");  // out/test -> clients/vscode -> repo
const PYTHON = process.env.LORALAB_PYTHON;
const MODEL = process.env.LORALAB_TEST_MODEL;
const skipDaemon = !PYTHON || !MODEL ? "set LORALAB_PYTHON and LORALAB_TEST_MODEL (tests/test_vscode_client.py does)" : false;

const fold = (s: PanelState, ms: ToPanel[]): PanelState => ms.reduce(reduce, s);

describe("pure panel logic", () => {
  it("checks webview messages before acting on them", () => {
    const settings = { adapter: "a", steps: 3, r: 4, lr: 1e-3, batchSize: 2, seqLen: 32 };
    assert.ok(isFromPanel({ type: "trainStart", settings }));
    assert.ok(isFromPanel({ type: "chat", chatId: 1, adapter: null, messages: [{ role: "user", content: "hi" }] }));
    assert.ok(isFromPanel({ type: "export", adapter: "a", format: "gguf" }));
    assert.ok(isFromPanel({ type: "calibrate", settings }));
    assert.ok(!isFromPanel({ type: "trainStart", settings: { ...settings, steps: "3" } }));
    assert.ok(!isFromPanel({ type: "chat", chatId: 1, adapter: null, messages: [{ role: "robot", content: "x" }] }));
    assert.ok(!isFromPanel({ type: "export", adapter: "a", format: "onnx" }));
    assert.ok(!isFromPanel({ type: "rm -rf" }) && !isFromPanel(null) && !isFromPanel([]));
  });

  it("smooths, downsamples and lays out the loss chart inside the canvas", () => {
    assert.deepEqual(ema([2, 2, 2], 0.9).map((x) => Number(x.toFixed(9))), [2, 2, 2]);  // debiased: no pull to 0
    const xs = Array.from({ length: 1000 }, (_, i) => i);
    const d = downsample(xs, 50);
    assert.equal(d.length, 50);
    assert.equal(d[0], 0);
    assert.equal(d[49], 999);
    assert.deepEqual(niceTicks(0, 10, 5), [0, 2, 4, 6, 8, 10]);
    const pts = Array.from({ length: 30 }, (_, i) => ({ step: i + 1, loss: 5 / (i + 1) }));
    const lay = layoutChart(pts, 300, 120, 20);
    assert.equal(lay.raw.length, 30);
    for (const [x, y] of [...lay.raw, ...lay.smooth]) {
      assert.ok(x >= 20 - 1e-9 && x <= 280 + 1e-9 && y >= 20 - 1e-9 && y <= 100 + 1e-9, `(${x}, ${y}) off the plot`);
    }
    assert.ok(lay.raw[0][1] < lay.raw[29][1], "higher loss is drawn higher (smaller y)");
    assert.deepEqual(layoutChart([], 300, 120), { raw: [], smooth: [], xTicks: [], yTicks: [] });
  });

  it("drops deltas of a stopped answer", () => {
    let s = askChat(initialState(), 1, "hi", null);
    s = fold(s, [{ type: "delta", chatId: 1, text: "he" }, { type: "chatStopped", chatId: 1 },
                 { type: "delta", chatId: 1, text: "llo" }]);
    assert.equal(s.turns[1].content, "he");
    assert.equal(s.pendingChat, null);
    assert.deepEqual(chatHistory(s), [{ role: "user", content: "hi" }, { role: "assistant", content: "he" }]);
  });
});

describe("the real daemon", { skip: skipDaemon }, () => {
  let home: string;
  let env: Record<string, string | undefined>;
  let child: ChildProcess;
  let conn: MessageConnection;
  let api: DaemonApi;
  let stderr = "";
  let dataset: string;

  before(async () => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), "loralab-vscode-"));
    env = { ...process.env, LORALAB_HOME: home, LORALAB_LOG: "WARNING", LORALAB_CHECK_RESULTS: "1",
            PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
    delete env.XDG_RUNTIME_DIR;
    dataset = path.join(home, "data.jsonl");
    fs.writeFileSync(dataset, Array.from({ length: 24 }, (_, i) =>
      JSON.stringify({ text: `the quick brown fox jumps over the lazy dog ${i}. hello world, this is a tiny tokenizer` })).join("\n") + "\n");
    const launch = launchCommand(PYTHON ?? "", env);  // exactly what the extension runs
    assert.deepEqual(launch.args, ["-m", "loralabd.server.main", "--stdio", "--ws"]);
    child = spawn(launch.command, launch.args, { env, cwd: home, stdio: ["pipe", "pipe", "pipe"] });
    child.stderr?.on("data", (d: Buffer) => { stderr += d.toString(); });
    if (!child.stdout || !child.stdin) throw new Error("no stdio pipes");
    conn = createMessageConnection(new StreamMessageReader(child.stdout), new StreamMessageWriter(child.stdin));
    conn.listen();
    api = new DaemonApi(conn);
  });

  after(() => {
    conn?.dispose();
    if (child && child.exitCode === null) child.kill("SIGKILL");
    if (home) fs.rmSync(home, { recursive: true, force: true });
  });

  it("answers initialize as vscode-languageclient sends it", async () => {
    const init: InitializeResult = await api.request("initialize", {
      processId: process.pid, clientInfo: { name: "Visual Studio Code", version: "1.85.0" }, rootUri: null,
      capabilities: { workspace: { applyEdit: true }, window: { workDoneProgress: true } }, locale: "en", trace: "off",
    });
    await conn.sendNotification("initialized", {});
    assert.equal(init.serverInfo.name, "loralabd", stderr);
    assert.equal(init.loralab.protocolVersion, PROTOCOL_VERSION);
    for (const m of ["model/load", "generate", "train/start", "adapter/export"]) assert.ok(init.loralab.methods.includes(m));
    assert.equal(fs.realpathSync(init.loralab.dataDir), fs.realpathSync(home));
  });

  it("finds the connection file where loralabd/paths.py puts it", () => {
    const py = execFileSync(PYTHON ?? "python3", ["-c", "from loralabd import paths; print(paths.connection_file())"],
                            { env, encoding: "utf8" }).trim();
    assert.equal(connectionFile(env), py);
    const info = readConnection(env);
    assert.ok(info, `no connection file at ${py}`);
    assert.equal(info.pid, child.pid);
  });

  it("loads a model and streams a chat answer into the panel state", async () => {
    const m = await api.request("model/load", { source: MODEL, name: "tiny", backend: "numpy" });
    assert.equal(m.id, "tiny");
    assert.equal(m.numLayers, 2);
    let s = askChat(reduce(initialState(), { type: "model", model: m }), 7, "the quick brown", null);
    const deltas: GenerateDelta[] = [];
    const res = await api.generate({ model: "tiny", prompt: "the quick brown", maxTokens: 12 }, (d) => {
      deltas.push(d);
      s = reduce(s, { type: "delta", chatId: 7, text: d.text });
    });
    assert.ok(res.tokens >= 1 && res.adapter === null);
    assert.ok(deltas.length >= 1, "no generate/delta notification came");
    assert.equal(deltas.map((d) => d.text).join(""), res.text);
    assert.deepEqual(deltas.map((d) => d.index), [...deltas.map((d) => d.index)].sort((a, b) => a - b));
    assert.equal(s.turns[1].content, res.text, "streamed text in the panel equals the final text");
    s = reduce(s, { type: "generated", chatId: 7, result: res });
    assert.equal(s.pendingChat, null);
    assert.equal(s.turns[1].tokensPerSecond, res.tokensPerSecond);
  });

  it("plans, calibrates, and plans again with a predicted time (the panel's Plan section)", async () => {
    const params = { model: "tiny", lora: { r: 4, alpha: 8 }, batchSize: 2, seqLen: 32, steps: 10 };
    const before = await api.request("plan/estimate", params);
    assert.ok(before.memory.total >= before.memory.weights && before.loraParameters > 0);
    const cal = await api.request("plan/calibrate", { model: "tiny" });
    assert.equal(cal.model, "tiny");
    assert.ok(cal.samples.length >= 1);
    const after = await api.request("plan/estimate", params);
    assert.ok((after.tokensPerSecond ?? 0) > 0 && (after.seconds ?? 0) > 0, JSON.stringify(after));
    let s = fold(initialState(), [{ type: "calibrating", on: true }, { type: "calibrating", on: false }, { type: "plan", plan: after }]);
    assert.equal(s.calibrating, false);
    assert.equal(s.plan?.tokensPerSecond, after.tokensPerSecond);
    s = reduce(s, { type: "error", section: "plan", message: "x" });
    assert.equal(reduce(s, { type: "plan", plan: after }).errors.plan, undefined);
  });

  it("trains with $/progress folded into the loss chart, then chats with the LoRA", async () => {
    const values: WorkDoneValue[] = [];
    let s = initialState();
    const job = await api.train({ model: "tiny", dataset, adapter: "vsc1", steps: 6, batchSize: 2, seqLen: 32,
                                  lora: { r: 4, alpha: 8 }, optimizer: { lr: 1e-2 } }, (v) => {
      values.push(v);
      s = reduce(s, { type: "progress", value: v });
    });
    assert.equal(job.state, "completed", job.error ?? "");
    assert.equal(job.step, 6);
    assert.equal(values[0].kind, "begin");
    assert.equal(values[values.length - 1].kind, "end");
    s = reduce(s, { type: "trainDone", job });
    assert.equal(s.train.running, false);
    assert.equal(s.train.step, 6);
    assert.ok(s.train.points.length >= 1 && s.train.points[s.train.points.length - 1].step === 6, JSON.stringify(s.train.points));
    assert.ok(s.train.points.every((p, i, a) => Number.isFinite(p.loss) && (i === 0 || a[i - 1].step < p.step)));
    assert.ok((s.train.tokensPerSecond ?? 0) > 0, "tokens/s from $/progress");
    assert.equal(layoutChart(s.train.points, 300, 120).raw.length, s.train.points.length);

    const adapters = (await api.request("adapter/list", undefined)).adapters;
    assert.ok(adapters.some((a) => a.name === "vsc1"));
    const text: string[] = [];
    const lora = await api.generate({ model: "tiny", prompt: "the quick brown", maxTokens: 8, adapter: "vsc1" }, (d) => text.push(d.text));
    assert.equal(lora.adapter, "vsc1");
    assert.equal(text.join(""), lora.text);

    const ex = await api.request("adapter/export", { adapter: "vsc1", format: "peft" });
    assert.ok(ex.files.some((f) => f.endsWith("adapter_model.safetensors")), JSON.stringify(ex));
    for (const f of ex.files) assert.ok(fs.existsSync(path.isAbsolute(f) ? f : path.join(ex.path, f)), f);
  });

  it("cancels training through the request's cancellation token (the panel's Cancel)", async () => {
    const cts = new CancellationTokenSource();
    let jobId = "";
    const p = api.train({ model: "tiny", dataset, adapter: "vsc-cancel", steps: 100000, batchSize: 2, seqLen: 32,
                          lora: { r: 4 } }, (v) => {
      if (v.train && !jobId) {
        jobId = v.train.jobId;
        cts.cancel();
      }
    }, cts.token);
    await assert.rejects(p, (e: unknown) => describeError(e).code === ErrorCodes.RequestCancelled);
    assert.ok(jobId, "a progress report named the job");
    const st = await api.request("train/status", { jobId });
    assert.equal(st.state, "cancelled");
    assert.equal(st.resumable, true);
    assert.ok(st.step < 100000);
  });

  it("reports daemon errors with what to do", async () => {
    await assert.rejects(api.request("generate", { model: "tiny", prompt: "x", adapter: "nope" }), (e: unknown) => {
      const d = describeError(e);
      return d.code === ErrorCodes.AdapterNotFound && d.message.includes("adapter/list");
    });
  });

  it("attaches over the websocket to the same daemon, and detaching leaves it running", async () => {
    const info = readConnection(env);
    assert.ok(info);
    const t = await attachWebSocket(info);
    const ws = createMessageConnection(t.reader, t.writer);
    ws.listen();
    const wapi = new DaemonApi(ws);
    const init: InitializeResult = await wapi.request("initialize", { processId: process.pid, clientInfo: { name: "vscode-test" } });
    assert.equal(init.loralab.pid, child.pid);
    assert.deepEqual((await wapi.request("model/list", undefined)).models.map((m) => m.id), ["tiny"]);
    const text: string[] = [];
    const res = await wapi.generate({ model: "tiny", prompt: "hello world", maxTokens: 10 }, (d) => text.push(d.text));
    assert.equal(text.join(""), res.text);
    assert.equal(await wapi.request("shutdown", undefined), null);  // answered by the transport: detach only
    await ws.sendNotification("exit");
    assert.equal(t.isClosed(), false);
    ws.end();  // what vscode-languageclient does after exit
    ws.dispose();
    assert.equal(t.isClosed(), true);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(child.exitCode, null, "detaching must not stop a shared daemon");
    assert.deepEqual((await api.request("model/list", undefined)).models.map((m) => m.id), ["tiny"]);
  });

  it("shuts down the LSP way: shutdown, exit, exit code 0", async () => {
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    assert.equal(await api.request("shutdown", undefined), null);
    await conn.sendNotification("exit");
    conn.end();  // vscode-languageclient closes the daemon's stdin right after exit, as here
    assert.equal(await exited, 0, stderr.slice(-2000));
  });
});
