// Type-level checks of the generated clients/vscode/src/protocol.ts (compiled by tests with tsc --strict).
import {
  DEFAULTS, ErrorCodes, GenerateParams, JobInfo, Notifications, ProgressParams, Requests, RequestMethod, TrainParams,
} from "../clients/vscode/src/protocol";

const train: TrainParams = {
  model: "default", dataset: "notes.jsonl", adapter: "pirate-v1", steps: 200,
  lora: { r: 8, alpha: 16, targets: ["all"], layers: null }, optimizer: { kind: "adamw", lr: 2e-4, betas: [0.9, 0.999] },
  schedule: "cosine", workDoneToken: "train-1",
};
const gen: Requests["generate"]["params"] = {
  model: "default", messages: [{ role: "user", content: "What is the capital of France?" }], partialResultToken: 1,
};
const progress: ProgressParams = { token: "t", value: { kind: "report", percentage: 5, train: {
  jobId: "j", step: 1, totalSteps: 20, loss: 2.5, lr: 1e-4, tokensPerSecond: 100, tokensSeen: 256, etaSeconds: null } } };
const delta: Notifications["generate/delta"] = { token: "gen-1", index: 3, text: "Paris" };
const methods: RequestMethod[] = ["initialize", "train/start", "generate", "adapter/export"];
const cancelled: number = ErrorCodes.RequestCancelled;

function finished(j: JobInfo): boolean {
  switch (j.state) {  // exhaustive over the generated JobState union
    case "completed": case "failed": return true;
    case "queued": case "running": case "cancelled": case "interrupted": return false;
  }
}

// protocol defaults are typed by the property they belong to, and read-only
const seqDefault: number = DEFAULTS.TrainParams.seqLen;
const loraDefaults: TrainParams["lora"] = DEFAULTS.TrainParams.lora;
const clip: number | null = DEFAULTS.TrainParams.maxGradNorm;
// @ts-expect-error: DEFAULTS is read-only
DEFAULTS.TrainParams.seqLen = 1;

// @ts-expect-error: adapter is required
const missing: TrainParams = { model: "m", dataset: "d", steps: 3 };
// @ts-expect-error: roles are a closed set
const badRole: GenerateParams = { model: "m", messages: [{ role: "robot", content: "x" }] };

export { train, gen, progress, delta, methods, cancelled, finished, missing, badRole, seqDefault, loraDefaults, clip };
