// The panel's state and the pure reducer that folds extension messages into it. The webview renders
// from this; the node tests drive it with the daemon's real notifications.
import type { JobView } from "./jobs";
import type { DaemonState, Section, ToPanel, TrainSettings } from "./messages";
import type {
  AdapterInfo, ChatMessage, DatasetInfo, ExportResult, ModelInfo, PlanEstimate,
} from "./protocol";

export interface ChatTurn {
  role: "user" | "assistant";
  content: string;
  tokensPerSecond: number | null;
}

/** One column of the compare view: the base model or an adapter at a scale, with its own history. */
export interface ChatColumn {
  id: number;
  adapter: string | null;  // null: the base model
  scale: number;
  turns: ChatTurn[];
  pending: number | null;  // chatId of the answer being streamed into this column
}

export interface Calibration {
  running: boolean;
  percentage: number | null;
  message: string;
}

export interface PanelState {
  daemon: { state: DaemonState; text: string };
  model: ModelInfo | null;
  plan: PlanEstimate | null;
  planning: boolean;
  calibration: Calibration;
  dataset: DatasetInfo | null;
  job: JobView | null;  // the job shown: the newest the panel heard of
  jobs: JobView[];      // the daemon's jobs this window knows of, newest first
  adapters: AdapterInfo[];
  columns: ChatColumn[];
  exported: ExportResult | null;
  errors: Partial<Record<Section, string>>;
}

export function initialState(): PanelState {
  return {
    daemon: { state: "starting", text: "starting the daemon" }, model: null, plan: null, planning: false,
    calibration: { running: false, percentage: null, message: "" }, dataset: null, job: null, jobs: [], adapters: [],
    columns: [{ id: 1, adapter: null, scale: 1, turns: [], pending: null }], exported: null, errors: {},
  };
}

function clearError(s: PanelState, section: Section): Partial<Record<Section, string>> {
  const errors = { ...s.errors };
  delete errors[section];
  return errors;
}

function mapColumn(s: PanelState, chatId: number, f: (c: ChatColumn) => ChatColumn): PanelState {
  const i = s.columns.findIndex((c) => c.pending === chatId);
  if (i < 0) return s;  // a stopped or stale answer
  const columns = s.columns.slice();
  columns[i] = f(columns[i]);
  return { ...s, columns };
}

function lastAnswer(c: ChatColumn, f: (t: ChatTurn) => ChatTurn): ChatTurn[] {
  const turns = c.turns.slice();
  const last = turns[turns.length - 1];
  if (last?.role === "assistant") turns[turns.length - 1] = f(last);
  return turns;
}

export function reduce(s: PanelState, m: ToPanel): PanelState {
  switch (m.type) {
    case "daemon":  // a daemon that (re)starts or comes up clears what the old one left
      return { ...s, daemon: { state: m.state, text: m.text },
               errors: m.state === "starting" || (m.state === "ready" && s.daemon.state !== "ready") ? {} : s.errors,
               model: m.state === "ready" ? s.model : null,
               calibration: m.state === "ready" ? s.calibration : initialState().calibration,
               planning: m.state === "ready" && s.planning,
               columns: m.state === "ready" ? s.columns : s.columns.map((c) => ({ ...c, pending: null })) };
    case "model":
      return { ...s, model: m.model };
    case "plan":
      return { ...s, plan: m.plan, planning: false, errors: clearError(s, "plan") };
    case "planning":
      return { ...s, planning: m.on, errors: m.on ? clearError(s, "plan") : s.errors };
    case "calibration":
      return { ...s, calibration: { running: m.running, percentage: m.percentage, message: m.message },
               errors: m.running ? clearError(s, "plan") : s.errors };
    case "dataset":
      return { ...s, dataset: m.dataset, errors: clearError(s, "dataset") };
    case "settings": case "ask": case "focus": case "run":
      return s;  // the webview applies these to its inputs
    case "job": {
      const jobs = [m.job, ...s.jobs.filter((j) => j.jobId !== m.job.jobId)].sort((a, b) => b.startedAt - a.startedAt).slice(0, 10);
      // the newest job takes the view; updates of an older one (another window's) do not take it over
      const show = !s.job || s.job.jobId === m.job.jobId || m.job.startedAt >= s.job.startedAt;
      return { ...s, jobs, job: show ? m.job : s.job,
               errors: show && m.job.state === "running" ? clearError(s, "train") : s.errors };
    }
    case "adapters":
      return { ...s, adapters: m.adapters };
    case "delta":
      return mapColumn(s, m.chatId, (c) => ({ ...c, turns: lastAnswer(c, (t) => ({ ...t, content: t.content + m.text })) }));
    case "generated": {  // the result's text is the authority over the streamed deltas
      const out = mapColumn(s, m.chatId, (c) => ({
        ...c, pending: null,
        turns: lastAnswer(c, (t) => ({ ...t, content: m.result.text, tokensPerSecond: m.result.tokensPerSecond })),
      }));
      return out.columns.some((c) => c.pending !== null) ? out : { ...out, errors: clearError(out, "chat") };
    }
    case "chatStopped":  // the streamed text so far stays
      return mapColumn(s, m.chatId, (c) => ({ ...c, pending: null }));
    case "exported":
      return { ...s, exported: m.result, errors: clearError(s, "export") };
    case "error": {
      const errors = { ...s.errors, [m.section]: m.message };
      if (m.section === "plan") return { ...s, errors, planning: false };
      return { ...s, errors };
    }
  }
}

/** Show another job of the list in the chart. */
export function showJob(s: PanelState, jobId: string): PanelState {
  const job = s.jobs.find((j) => j.jobId === jobId);
  return job ? { ...s, job } : s;
}

export function chatPending(s: PanelState): boolean {
  return s.columns.some((c) => c.pending !== null);
}

/** The conversation a column sends with a new question: its own finished turns, then the question. */
export function columnMessages(c: ChatColumn, question: string): ChatMessage[] {
  const done = c.turns.filter((t, i) => !(i === c.turns.length - 1 && t.role === "assistant" && t.content === ""));
  return [...done.map((t) => ({ role: t.role, content: t.content })), { role: "user", content: question }];
}

/** The user asked something: in each column, their turn and an empty answer to stream into. chatIds come
 * from firstId on, one per column in order. */
export function ask(s: PanelState, firstId: number, text: string): PanelState {
  return { ...s, errors: clearError(s, "chat"), columns: s.columns.map((c, i) => ({
    ...c, pending: firstId + i,
    turns: [...c.turns, { role: "user", content: text, tokensPerSecond: null },
            { role: "assistant", content: "", tokensPerSecond: null }],
  })) };
}

export function addColumn(s: PanelState, adapter: string | null, scale = 1): PanelState {
  const id = Math.max(0, ...s.columns.map((c) => c.id)) + 1;
  return { ...s, columns: [...s.columns, { id, adapter, scale, turns: [], pending: null }] };
}

export function removeColumn(s: PanelState, id: number): PanelState {
  return s.columns.length <= 1 ? s : { ...s, columns: s.columns.filter((c) => c.id !== id) };
}

/** Change what a column asks (its history belongs to the old model, so it starts over). */
export function setColumn(s: PanelState, id: number, adapter: string | null, scale: number): PanelState {
  return { ...s, columns: s.columns.map((c) => c.id !== id ? c
    : c.adapter === adapter ? { ...c, scale } : { ...c, adapter, scale, turns: [] }) };
}

export function clearChat(s: PanelState): PanelState {
  return { ...s, columns: s.columns.map((c) => ({ ...c, turns: [], pending: null })) };
}

/** Settings the panel proposes, each with the change that applies it. */
export interface Suggestion {
  text: string;
  patch: Partial<TrainSettings>;
}

const roundUp8 = (n: number): number => Math.max(8, Math.ceil(n / 8) * 8);

export function suggest(plan: PlanEstimate | null, dataset: DatasetInfo | null, t: TrainSettings): Suggestion[] {
  const out: Suggestion[] = [];
  if (dataset && dataset.lengths.max > 0 && roundUp8(dataset.lengths.max) < t.seqLen) {
    const seq = roundUp8(dataset.lengths.max);
    out.push({ text: `seq ${seq}: the longest example is ${dataset.lengths.max} tokens, so each step is about ` +
      `${Math.max(2, Math.round(t.seqLen / seq))}× cheaper than at ${t.seqLen}`, patch: { seqLen: seq } });
  }
  if (plan) {
    const a = plan.advice;
    if (plan.fits === false) {
      if (a.maxBatch !== null && a.maxBatch < t.batchSize) out.push({ text: `batch ${a.maxBatch}: the largest that fits`, patch: { batchSize: a.maxBatch } });
      else if (a.maxSeq !== null && a.maxSeq < t.seqLen) out.push({ text: `seq ${a.maxSeq}: the longest that fits`, patch: { seqLen: a.maxSeq } });
    }
    const budget = t.budgetMinutes * 60;
    if (plan.seconds !== null && budget > 0 && plan.seconds > budget) {
      if (a.rankForBudget !== null && a.rankForBudget < t.r) {
        out.push({ text: `rank ${a.rankForBudget}: meets the ${t.budgetMinutes} min budget`, patch: { r: a.rankForBudget } });
      } else if (a.stepsInBudget !== null && a.stepsInBudget >= 1 && a.stepsInBudget < t.steps) {
        out.push({ text: `${a.stepsInBudget} steps at rank 1: what the ${t.budgetMinutes} min budget buys`,
                   patch: { steps: a.stepsInBudget, r: 1 } });
      } else if (plan.stepSeconds !== null && plan.stepSeconds > 0) {
        const steps = Math.max(1, Math.floor((budget - (plan.seconds - plan.stepSeconds * plan.steps)) / plan.stepSeconds));
        if (steps < t.steps) out.push({ text: `${steps} steps: what the ${t.budgetMinutes} min budget buys`, patch: { steps } });
      }
    }
  }
  return out;
}
