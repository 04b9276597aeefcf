// Messages between the extension and the panel's webview. Both sides import these types; what comes
// from the webview is checked with isFromPanel before it is acted on.
import type { WorkDoneValue } from "./lsp_ext";
import type {
  AdapterInfo, ChatMessage, DatasetInfo, ExportFormat, ExportResult, GenerateResult, JobInfo, ModelInfo, PlanEstimate,
} from "./protocol";
import { ExportFormatValues } from "./protocol";

export type Section = "daemon" | "plan" | "dataset" | "train" | "chat" | "export";

export interface TrainSettings {
  adapter: string;
  steps: number;
  r: number;
  lr: number;
  batchSize: number;
  seqLen: number;
}

/** extension -> webview */
export type ToPanel =
  | { type: "daemon"; state: "starting" | "ready" | "stopped"; text: string }
  | { type: "model"; model: ModelInfo }
  | { type: "plan"; plan: PlanEstimate }
  | { type: "calibrating"; on: boolean }
  | { type: "dataset"; dataset: DatasetInfo }
  | { type: "progress"; value: WorkDoneValue }
  | { type: "trainDone"; job: JobInfo }
  | { type: "trainCancelled" }
  | { type: "adapters"; adapters: AdapterInfo[] }
  | { type: "delta"; chatId: number; text: string }
  | { type: "generated"; chatId: number; result: GenerateResult }
  | { type: "chatStopped"; chatId: number }
  | { type: "exported"; result: ExportResult }
  | { type: "error"; section: Section; message: string };

/** webview -> extension */
export type FromPanel =
  | { type: "ready" }
  | { type: "plan"; settings: TrainSettings }
  | { type: "calibrate"; settings: TrainSettings }
  | { type: "pickDataset" }
  | { type: "trainStart"; settings: TrainSettings }
  | { type: "trainCancel" }
  | { type: "chat"; chatId: number; messages: ChatMessage[]; adapter: string | null }
  | { type: "chatStop" }
  | { type: "export"; adapter: string; format: ExportFormat };

const isObj = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);
const isNum = (x: unknown): x is number => typeof x === "number" && Number.isFinite(x);

function isSettings(x: unknown): x is TrainSettings {
  return isObj(x) && typeof x.adapter === "string" && isNum(x.steps) && isNum(x.r) && isNum(x.lr) &&
    isNum(x.batchSize) && isNum(x.seqLen);
}

function isChat(x: unknown): x is ChatMessage[] {
  return Array.isArray(x) && x.every((m) => isObj(m) && typeof m.content === "string" &&
    (m.role === "system" || m.role === "user" || m.role === "assistant"));
}

/** A webview message is untrusted input: check its shape before acting on it. */
export function isFromPanel(x: unknown): x is FromPanel {
  if (!isObj(x)) return false;
  switch (x.type) {
    case "ready": case "pickDataset": case "trainCancel": case "chatStop": return true;
    case "plan": case "calibrate": case "trainStart": return isSettings(x.settings);
    case "chat": return isNum(x.chatId) && isChat(x.messages) && (x.adapter === null || typeof x.adapter === "string");
    case "export": return typeof x.adapter === "string" &&
      (ExportFormatValues as readonly unknown[]).includes(x.format);
    default: return false;
  }
}
