// Training jobs as the extension sees them: each job's metrics and history folded from its $/progress
// (train/start, train/resume or train/follow: one path), whoever started it. The daemon owns the jobs, so
// after a reload the tracker follows the running ones again (train/list + train/follow). No vscode import:
// the node tests drive it against the real daemon.
import type { Disposable } from "vscode-jsonrpc";
import type { DaemonApi } from "./api";
import type { WorkDoneValue } from "./lsp_ext";
import type { JobInfo, JobState, TrainParams, TrainProgress } from "./protocol";

export interface Point {
  step: number;
  value: number;
}

export interface JobView {
  jobId: string;
  adapter: string;
  state: JobState;
  step: number;
  totalSteps: number;
  loss: number | null;
  valLoss: number | null;
  lr: number | null;
  tokensPerSecond: number | null;
  etaSeconds: number | null;
  lossPoints: Point[];  // one per step reported, in step order
  valPoints: Point[];   // each validation loss, at the step it was measured
  lrPoints: Point[];
  startedAt: number;    // ms since the epoch: when the job was created
  endedAt: number | null;
  predictedSeconds: number | null;  // the plan's prediction for the whole run, when it had one
  resumable: boolean;
  error: string | null;
  message: string;      // the begin title, or the end's outcome
}

const MAX_POINTS = 4000;

/** Append (step, value), replacing a point of the same step; thinned to every other point past MAX_POINTS. */
function addPoint(points: Point[], step: number, value: number | null | undefined): Point[] {
  if (value === null || value === undefined || !Number.isFinite(value)) return points;
  const last = points[points.length - 1];
  if (last !== undefined && step < last.step) return points;
  let out = last !== undefined && step === last.step ? [...points.slice(0, -1), { step, value }] : [...points, { step, value }];
  if (out.length > MAX_POINTS) out = out.filter((_, i) => i % 2 === 0 || i === out.length - 1);
  return out;
}

export function newJob(jobId: string, adapter: string, startedAt: number): JobView {
  return { jobId, adapter, state: "running", step: 0, totalSteps: 0, loss: null, valLoss: null, lr: null,
           tokensPerSecond: null, etaSeconds: null, lossPoints: [], valPoints: [], lrPoints: [], startedAt,
           endedAt: null, predictedSeconds: null, resumable: false, error: null, message: "" };
}

function withMetrics(j: JobView, p: TrainProgress): JobView {
  const valChanged = p.valLoss !== undefined && p.valLoss !== null && p.valLoss !== j.valLoss;
  return { ...j, step: p.step, totalSteps: p.totalSteps, loss: p.loss, lr: p.lr, tokensPerSecond: p.tokensPerSecond,
           etaSeconds: p.etaSeconds, valLoss: p.valLoss ?? j.valLoss,
           lossPoints: addPoint(j.lossPoints, p.step, p.loss),
           valPoints: valChanged ? addPoint(j.valPoints, p.step, p.valLoss) : j.valPoints,
           lrPoints: addPoint(j.lrPoints, p.step, p.lr) };
}

/** Fold one $/progress value into the job's view. A begin keeps the history: a follow after a reload
 * continues the chart the panel had. */
export function foldProgress(j: JobView, v: WorkDoneValue, now: number): JobView {
  let out: JobView = v.kind === "begin" ? { ...j, state: "running", endedAt: null, message: v.title, error: null }
    : v.kind === "end" ? { ...j, endedAt: now, etaSeconds: 0, message: v.message ?? j.message } : j;
  if (v.train) out = withMetrics(out, v.train);
  return out;
}

/** The journal's word on a job (train/status, train/list): state, resumability, error. */
export function foldInfo(j: JobView, info: JobInfo, now: number): JobView {
  const ended = info.state !== "running" && info.state !== "queued";
  return { ...j, state: info.state, step: Math.max(j.step, info.step), totalSteps: info.totalSteps || j.totalSteps,
           loss: j.loss ?? info.loss, resumable: info.resumable, error: info.error,
           endedAt: ended ? j.endedAt ?? Math.min(now, info.updatedAt * 1000) : null, etaSeconds: ended ? 0 : j.etaSeconds };
}

export function isRunning(j: JobView): boolean {
  return j.state === "running" || j.state === "queued";
}

/** 0..100 of the steps done. */
export function percent(j: JobView): number {
  return j.totalSteps > 0 ? Math.min(100, Math.floor((100 * j.step) / j.totalSteps)) : 0;
}

/** Seconds since the job started (until it ended), from wall clock times. */
export function elapsedSeconds(j: JobView, now: number): number {
  return Math.max(0, ((j.endedAt ?? now) - j.startedAt) / 1000);
}

export class JobTracker {
  private readonly jobs = new Map<string, JobView>();
  private readonly subs = new Map<string, Disposable>();

  constructor(private readonly api: DaemonApi, private readonly changed: (j: JobView) => void,
              saved: JobView[] = []) {
    for (const j of saved) this.jobs.set(j.jobId, j);
  }

  dispose(): void {
    for (const s of this.subs.values()) s.dispose();
    this.subs.clear();
  }

  all(): JobView[] {
    return [...this.jobs.values()].sort((a, b) => b.startedAt - a.startedAt);
  }

  get(jobId: string): JobView | undefined {
    return this.jobs.get(jobId);
  }

  running(): JobView[] {
    return this.all().filter(isRunning);
  }

  private set(j: JobView): JobView {
    this.jobs.set(j.jobId, j);
    this.changed(j);
    return j;
  }

  private listen(jobId: string, token: string): void {
    this.subs.get(jobId)?.dispose();
    this.subs.set(jobId, this.api.onProgress(token, (v) => {
      const j = this.jobs.get(jobId);
      if (!j) return;
      this.set(foldProgress(j, v, Date.now()));
      if (v.kind === "end") void this.ended(jobId);
    }));
  }

  private async ended(jobId: string): Promise<void> {
    this.subs.get(jobId)?.dispose();
    this.subs.delete(jobId);
    try {
      const info = await this.api.request("train/status", { jobId });
      const j = this.jobs.get(jobId);
      if (j) this.set(foldInfo(j, info, Date.now()));
    } catch { /* the daemon went away; the end message stays */ }
  }

  /** train/start without waiting: the job's progress comes on a token the tracker listens to. */
  async start(params: Omit<TrainParams, "workDoneToken" | "wait">, predictedSeconds: number | null): Promise<JobView> {
    const token = this.api.token("train");
    const pending: WorkDoneValue[] = [];  // progress that arrives before the answer names the job
    const early = this.api.onProgress(token, (v) => pending.push(v));
    let info: JobInfo;
    try {
      info = await this.api.request("train/start", { ...params, wait: false, workDoneToken: token });
    } finally {
      early.dispose();
    }
    let j = { ...newJob(info.jobId, info.adapter, info.createdAt * 1000), predictedSeconds };
    for (const v of pending) j = foldProgress(j, v, Date.now());
    this.set(foldInfo(j, info, Date.now()));
    this.listen(info.jobId, token);
    if (pending.some((v) => v.kind === "end")) void this.ended(info.jobId);
    return this.jobs.get(info.jobId) ?? j;
  }

  /** Follow a job that runs in the daemon (started by another window, the CLI, or before a reload). */
  async follow(info: JobInfo): Promise<void> {
    if (this.subs.has(info.jobId)) return;
    const token = this.api.token("follow");
    const prev = this.jobs.get(info.jobId);
    this.set(foldInfo(prev ?? newJob(info.jobId, info.adapter, info.createdAt * 1000), info, Date.now()));
    this.listen(info.jobId, token);
    try {
      await this.api.request("train/follow", { jobId: info.jobId, workDoneToken: token, wait: false });
    } catch {
      await this.ended(info.jobId);  // it ended meanwhile
    }
  }

  /** Follow every job the daemon runs now; list the journal's newest jobs too (started by another window, the CLI,
   * or before VS Code restarted: their state and steps, without a chart). */
  async followRunning(recent = 5): Promise<void> {
    const { jobs } = await this.api.request("train/list", undefined);
    for (const [i, info] of jobs.entries()) {
      if (info.state === "running") await this.follow(info);
      else {
        const j = this.jobs.get(info.jobId);
        if (j) { if (isRunning(j)) this.set(foldInfo(j, info, Date.now())); }  // it ended while we were away
        else if (i < recent) this.set(foldInfo(newJob(info.jobId, info.adapter, info.createdAt * 1000), info, Date.now()));
      }
    }
  }

  /** Stop after the current step (checkpointed, resumable); answers when it has stopped. */
  async cancel(jobId: string): Promise<void> {
    const info = await this.api.request("train/cancel", { jobId });
    const j = this.jobs.get(jobId);
    if (j) this.set(foldInfo(j, info, Date.now()));
  }

  async resume(jobId: string): Promise<void> {
    const token = this.api.token("train");
    this.listen(jobId, token);
    const info = await this.api.request("train/resume", { jobId, wait: false, workDoneToken: token });
    const j = this.jobs.get(jobId) ?? newJob(info.jobId, info.adapter, info.createdAt * 1000);
    this.set(foldInfo(j, info, Date.now()));
  }
}
