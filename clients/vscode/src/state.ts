// The panel's state and the pure reducer that folds extension messages into it. The webview renders
// from this; the node tests drive it with the daemon's real notifications.
import type { ToPanel, Section } from "./messages";
import type {
  AdapterInfo, ChatMessage, DatasetInfo, ExportResult, ModelInfo, PlanEstimate, TrainProgress,
} from "./protocol";

export interface LossPoint {
  step: number;
  loss: number;
}

export interface TrainView {
  running: boolean;
  jobId: string | null;
  step: number;
  totalSteps: number;
  loss: number | null;
  valLoss: number | null;
  tokensPerSecond: number | null;
  etaSeconds: number | null;
  points: LossPoint[];  // one per step reported, in step order
  message: string;
}

export interface ChatTurn {
  role: "user" | "assistant";
  content: string;
  adapter: string | null;  // null: the base model
  tokensPerSecond: number | null;
}

export interface PanelState {
  daemon: { state: "starting" | "ready" | "stopped"; text: string };
  model: ModelInfo | null;
  plan: PlanEstimate | null;
  calibrating: boolean;
  dataset: DatasetInfo | null;
  train: TrainView;
  adapters: AdapterInfo[];
  turns: ChatTurn[];
  pendingChat: number | null;  // chatId of the answer being streamed
  exported: ExportResult | null;
  errors: Partial<Record<Section, string>>;
}

export function initialState(): PanelState {
  return {
    daemon: { state: "starting", text: "starting the daemon" }, model: null, plan: null, calibrating: false, dataset: null,
    train: { running: false, jobId: null, step: 0, totalSteps: 0, loss: null, valLoss: null, tokensPerSecond: null,
             etaSeconds: null, points: [], message: "" },
    adapters: [], turns: [], pendingChat: null, exported: null, errors: {},
  };
}

function withMetrics(t: TrainView, p: TrainProgress): TrainView {
  let points = t.points;
  if (p.loss !== null && Number.isFinite(p.loss)) {
    const last = points[points.length - 1];
    if (last === undefined || p.step > last.step) points = [...points, { step: p.step, loss: p.loss }];
    else if (p.step === last.step) points = [...points.slice(0, -1), { step: p.step, loss: p.loss }];
  }
  return { ...t, jobId: p.jobId, step: p.step, totalSteps: p.totalSteps, loss: p.loss, points,
           valLoss: p.valLoss ?? t.valLoss, tokensPerSecond: p.tokensPerSecond, etaSeconds: p.etaSeconds };
}

function clearError(s: PanelState, section: Section): Partial<Record<Section, string>> {
  const errors = { ...s.errors };
  delete errors[section];
  return errors;
}

export function reduce(s: PanelState, m: ToPanel): PanelState {
  switch (m.type) {
    case "daemon":
      return { ...s, daemon: { state: m.state, text: m.text }, errors: m.state === "ready" ? clearError(s, "daemon") : s.errors };
    case "model":
      return { ...s, model: m.model };
    case "plan":
      return { ...s, plan: m.plan, errors: clearError(s, "plan") };
    case "calibrating":
      return { ...s, calibrating: m.on, errors: m.on ? clearError(s, "plan") : s.errors };
    case "dataset":
      return { ...s, dataset: m.dataset, errors: clearError(s, "dataset") };
    case "progress": {
      const v = m.value;
      let t = s.train;
      if (v.kind === "begin") {
        t = { ...initialState().train, running: true, message: v.title };
      } else {
        t = { ...t, message: v.message ?? t.message, running: v.kind !== "end" && t.running };
      }
      if (v.train) t = withMetrics(t, v.train);
      return { ...s, train: t, errors: v.kind === "begin" ? clearError(s, "train") : s.errors };
    }
    case "trainDone": {
      const j = m.job;
      return { ...s, train: { ...s.train, running: false, jobId: j.jobId, step: j.step, totalSteps: j.totalSteps,
                              loss: j.loss ?? s.train.loss, message: `${j.state}: ${j.adapter}, step ${j.step}/${j.totalSteps}` +
                              (j.error ? ` (${j.error})` : "") } };
    }
    case "trainCancelled":
      return { ...s, train: { ...s.train, running: false, message: "cancelled (checkpointed; resume with `loralab train --resume`)" } };
    case "adapters":
      return { ...s, adapters: m.adapters };
    case "delta": {
      if (m.chatId !== s.pendingChat) return s;  // a stopped or stale answer
      const turns = s.turns.slice();
      const last = turns[turns.length - 1];
      if (last?.role !== "assistant") return s;
      turns[turns.length - 1] = { ...last, content: last.content + m.text };
      return { ...s, turns };
    }
    case "generated": {
      if (m.chatId !== s.pendingChat) return s;
      const turns = s.turns.slice();
      const last = turns[turns.length - 1];
      if (last?.role === "assistant") {  // the result's text is the authority over the streamed deltas
        turns[turns.length - 1] = { ...last, content: m.result.text, tokensPerSecond: m.result.tokensPerSecond };
      }
      return { ...s, turns, pendingChat: null, errors: clearError(s, "chat") };
    }
    case "chatStopped":  // the streamed text so far stays
      return m.chatId === s.pendingChat ? { ...s, pendingChat: null } : s;
    case "exported":
      return { ...s, exported: m.result, errors: clearError(s, "export") };
    case "error": {
      const errors = { ...s.errors, [m.section]: m.message };
      if (m.section === "chat") return { ...s, errors, pendingChat: null };
      if (m.section === "train") return { ...s, errors, train: { ...s.train, running: false } };
      return { ...s, errors };
    }
  }
}

/** The user asked something: add their turn and an empty answer to stream into. */
export function askChat(s: PanelState, chatId: number, text: string, adapter: string | null): PanelState {
  return { ...s, pendingChat: chatId, turns: [...s.turns, { role: "user", content: text, adapter, tokensPerSecond: null },
                                              { role: "assistant", content: "", adapter, tokensPerSecond: null }] };
}

/** The conversation to send with a new question: every finished turn (the empty answer last is left out). */
export function chatHistory(s: PanelState): ChatMessage[] {
  const turns = s.turns.filter((t, i) => !(i === s.turns.length - 1 && t.role === "assistant" && t.content === ""));
  return turns.map((t) => ({ role: t.role, content: t.content }));
}
