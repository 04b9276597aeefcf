// Messages between the extension and the panel's webview. Both sides import these types; what comes
// from the webview is checked with isFromPanel before it is acted on.
import type { JobView } from "./jobs";
import type {
  AdapterInfo, ChatMessage, DatasetInfo, ExportFormat, ExportResult, GenerateResult, ModelInfo, PlanEstimate,
} from "./protocol";
import { ExportFormatValues } from "./protocol";

export type Section = "daemon" | "plan" | "dataset" | "train" | "chat" | "export";
export type DaemonState = "stopped" | "starting" | "ready" | "failed";

export interface TrainSettings {
  adapter: string;
  steps: number;
  r: number;
  lr: number;
  batchSize: number;
  seqLen: number;
  evalEvery: number;      // steps between validation losses (0: only at the end)
  valPercent: number;     // held-out share of the data when it has no valid.jsonl (0: none)
  budgetMinutes: number;  // the plan's time budget: it advises settings that meet it
}

/** extension -> webview */
export type ToPanel =
  | { type: "daemon"; state: DaemonState; text: string }
  | { type: "model"; model: ModelInfo | null }
  | { type: "plan"; plan: PlanEstimate }
  | { type: "planning"; on: boolean }
  | { type: "calibration"; running: boolean; percentage: number | null; message: string }
  | { type: "dataset"; dataset: DatasetInfo }
  | { type: "settings"; settings: Partial<TrainSettings> }
  | { type: "job"; job: JobView }
  | { type: "adapters"; adapters: AdapterInfo[] }
  | { type: "delta"; chatId: number; text: string }
  | { type: "generated"; chatId: number; result: GenerateResult }
  | { type: "chatStopped"; chatId: number }
  | { type: "ask"; prompt: string }
  | { type: "exported"; result: ExportResult }
  | { type: "focus"; section: Section }
  | { type: "run"; what: "plan" | "train"; fit?: boolean }  // fit: take the dataset's suggested seq first
  | { type: "error"; section: Section; message: string };

/** webview -> extension */
export type FromPanel =
  | { type: "ready"; dataset: string | null }  // dataset: the one picked before a reload, to inspect again
  | { type: "plan"; settings: TrainSettings }
  | { type: "calibrate"; settings: TrainSettings }
  | { type: "calibrateCancel" }
  | { type: "pickDataset" }
  | { type: "trainStart"; settings: TrainSettings }
  | { type: "trainCancel"; jobId: string }
  | { type: "trainResume"; jobId: string }
  | { type: "chat"; chatId: number; messages: ChatMessage[]; adapter: string | null; scale: number }
  | { type: "chatStop" }
  | { type: "export"; adapter: string; format: ExportFormat }
  | { type: "openSettings"; setting: string };

const isObj = (x: unknown): x is Record<string, unknown> => typeof x === "object" && x !== null && !Array.isArray(x);
const isNum = (x: unknown): x is number => typeof x === "number" && Number.isFinite(x);
const isStr = (x: unknown): x is string => typeof x === "string";

export function isSettings(x: unknown): x is TrainSettings {
  return isObj(x) && isStr(x.adapter) && isNum(x.steps) && isNum(x.r) && isNum(x.lr) && isNum(x.batchSize) &&
    isNum(x.seqLen) && isNum(x.evalEvery) && isNum(x.valPercent) && isNum(x.budgetMinutes);
}

function isChat(x: unknown): x is ChatMessage[] {
  return Array.isArray(x) && x.every((m) => isObj(m) && isStr(m.content) &&
    (m.role === "system" || m.role === "user" || m.role === "assistant"));
}

/** A webview message is untrusted input: check its shape before acting on it. */
export function isFromPanel(x: unknown): x is FromPanel {
  if (!isObj(x)) return false;
  switch (x.type) {
    case "ready": return x.dataset === null || isStr(x.dataset);
    case "pickDataset": case "chatStop": case "calibrateCancel": return true;
    case "plan": case "calibrate": case "trainStart": return isSettings(x.settings);
    case "trainCancel": case "trainResume": return isStr(x.jobId);
    case "chat": return isNum(x.chatId) && isChat(x.messages) && (x.adapter === null || isStr(x.adapter)) && isNum(x.scale);
    case "export": return isStr(x.adapter) && (ExportFormatValues as readonly unknown[]).includes(x.format);
    case "openSettings": return isStr(x.setting) && x.setting.startsWith("loralab.");
    default: return false;
  }
}
