// Finding the daemon: the connection file of a running one (mirrors loralabd/paths.py), or how to start one.
// No vscode import here, so the node tests exercise it as it is.
import * as crypto from "crypto";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";

type Env = Record<string, string | undefined>;

/** What `loralabd` writes to its connection file (mode 0600). */
export interface ConnectionInfo {
  pid: number;
  host: string;
  port: number;
  token: string;
  url: string;
  dataDir?: string;
  version?: string;
}

function expandHome(p: string): string {
  return p === "~" || p.startsWith("~/") ? path.join(os.homedir(), p.slice(1)) : p;
}

function realpath(p: string): string {
  try { return fs.realpathSync(p); } catch { return path.resolve(p); }
}

/** The data directory, as loralabd/paths.py data_dir() computes it. */
export function dataDir(env: Env = process.env, platform: string = process.platform): string {
  let p: string;
  if (env.LORALAB_HOME) p = expandHome(env.LORALAB_HOME);
  else if (platform === "darwin") p = path.join(os.homedir(), "Library", "Application Support", "LoRA Lab");
  else if (platform === "win32") p = path.join(env.LOCALAPPDATA ?? path.join(os.homedir(), "AppData", "Local"), "LoRALab");
  else p = path.join(env.XDG_DATA_HOME || path.join(os.homedir(), ".local", "share"), "loralab");
  return realpath(p);
}

/** The connection file of the daemon for that data directory (one per data directory). */
export function connectionFile(env: Env = process.env, platform: string = process.platform): string {
  const data = dataDir(env, platform);
  let run: string;
  if (env.LORALAB_HOME) run = path.join(data, "run");
  else if (env.XDG_RUNTIME_DIR) run = path.join(env.XDG_RUNTIME_DIR, "loralab");
  else run = path.join(data, "run");
  const tag = crypto.createHash("sha256").update(data, "utf8").digest("hex").slice(0, 12);
  return path.join(run, `loralabd-${tag}.json`);
}

function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

function isConnectionInfo(x: unknown): x is ConnectionInfo {
  if (typeof x !== "object" || x === null) return false;
  const o = x as Record<string, unknown>;
  return typeof o.pid === "number" && typeof o.port === "number" && typeof o.token === "string" &&
    typeof o.url === "string" && typeof o.host === "string";
}

/** The running daemon's connection info, or undefined when there is none (no file, or its process is gone). */
export function readConnection(env: Env = process.env): ConnectionInfo | undefined {
  let raw: string;
  try { raw = fs.readFileSync(connectionFile(env), "utf8"); } catch { return undefined; }
  let info: unknown;
  try { info = JSON.parse(raw); } catch { return undefined; }
  return isConnectionInfo(info) && pidAlive(info.pid) ? info : undefined;
}

export interface Launch {
  command: string;
  args: string[];
}

function onPath(name: string, env: Env): string | undefined {
  const exts = process.platform === "win32" ? [".exe", ".cmd", ""] : [""];
  for (const dir of (env.PATH ?? "").split(path.delimiter)) {
    for (const ext of exts) {
      const p = path.join(dir, name + ext);
      try {
        fs.accessSync(p, fs.constants.X_OK);
        if (fs.statSync(p).isFile()) return p;
      } catch { /* not here */ }
    }
  }
  return undefined;
}

/** How to start a stdio daemon. `--ws` serves the websocket too, so the CLI and other windows attach to it. */
export function launchCommand(pythonPath: string, env: Env = process.env): Launch {
  const args = ["--stdio", "--ws"];
  if (pythonPath.trim()) return { command: expandHome(pythonPath.trim()), args: ["-m", "loralabd.server.main", ...args] };
  const script = onPath("loralabd", env);
  if (script) return { command: script, args };
  const py = process.platform === "win32" ? "python" : "python3";
  return { command: py, args: ["-m", "loralabd.server.main", ...args] };
}

/** A message for a daemon that could not start, saying what to do. */
export function startFailure(launch: Launch, detail: string): string {
  return `LoRA Lab could not start its daemon (${launch.command} ${launch.args.join(" ")}): ${detail}. ` +
    "Install it (`pip install -e .` in the LoRA Lab repo) or set `loralab.pythonPath` to a Python that has it.";
}
