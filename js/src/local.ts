/**
 * Local mode in Node: a `realm-nb serve` child on loopback, one per process, shared by every
 * `Realm({ mode: "local" })` of the process (as the Python SDK's local mode shares one kernel).
 *
 * The weights and the jitted host live in Python, so "local" here means a runtime this process
 * owns: it listens on 127.0.0.1 on a port of its own choosing (`--port 0`; the port is read from
 * the line it prints once ready), accepts one random key (the keys file is owner-only and deleted
 * once read), and never outlives this process: it is stopped when the last Realm using it is
 * closed or when this process exits, and `--parent-pid` makes it exit on its own if this process
 * dies without running any cleanup (killed).
 */

import { ServerConnectionError } from "./errors.js";
import { baseUrl } from "./http.js";
import { nodeModule } from "./runtime.js";
import type { FoundRuntime } from "./runtime.js";

export interface LocalRuntimeOptions {
  /** How to run the CLI (default `["realm-nb"]`; e.g. `["python", "-m", "realm_nb"]`). */
  command?: readonly string[] | undefined;
  /** More arguments for `serve` (e.g. `["--lazy"]` to answer before the model is loaded). */
  args?: readonly string[] | undefined;
  /** How long to wait for it to answer (default 300 s: a first start may compile). */
  startTimeoutMs?: number | undefined;
}

type ChildProcess = import("node:child_process").ChildProcess;
type ChildModule = typeof import("node:child_process");
type Fs = typeof import("node:fs/promises");
type Path = typeof import("node:path");
type Os = typeof import("node:os");
type Crypto = typeof import("node:crypto");

const READY = /serving .* at (http:\/\/\S+?)\/v1 /;
const TAIL_LINES = 20;

interface Running {
  found: FoundRuntime;
  child: ChildProcess;
  users: number;
  stop: () => Promise<void>;
}

let shared: Promise<Running> | null = null;

/**
 * The process's local runtime, started on first use; each acquire needs one `release`. The first
 * caller's options start it; later callers share it as it is.
 */
export async function acquireLocalRuntime(options: LocalRuntimeOptions, model: string | undefined,
                                          weights: string | undefined): Promise<FoundRuntime> {
  if (shared === null) {
    shared = start(options, model, weights);
    shared.catch(() => { shared = null; }); // a failed start is tried again on the next use
  }
  const running = await shared;
  running.users += 1;
  return running.found;
}

/** One user is done; the last one stops the runtime. */
export async function releaseLocalRuntime(): Promise<void> {
  if (shared === null) return;
  const running = await shared.catch(() => null);
  if (running === null) return;
  running.users -= 1;
  if (running.users <= 0) {
    shared = null;
    await running.stop();
  }
}

async function start(options: LocalRuntimeOptions, model: string | undefined,
                     weights: string | undefined): Promise<Running> {
  const { spawn } = await nodeModule<ChildModule>("node:child_process");
  const fs = await nodeModule<Fs>("node:fs/promises");
  const path = await nodeModule<Path>("node:path");
  const os = await nodeModule<Os>("node:os");
  const crypto = await nodeModule<Crypto>("node:crypto");

  const key = `sk-local-${crypto.randomBytes(24).toString("hex")}`;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "realm-nb-js-"));
  const keysFile = path.join(dir, "keys.toml");
  // The key speaks for many tenants, so `new Realm({ mode: "local", tenant })` can name one.
  await fs.writeFile(keysFile, `[keys."${key}"]\ntenant = "default"\nname_tenants = true\n`,
                     { mode: 0o600 });
  const forget = (): Promise<void> => fs.rm(dir, { recursive: true, force: true });

  const [program = "realm-nb", ...pre] = options.command ?? ["realm-nb"];
  const args = [...pre, "serve", "--host", "127.0.0.1", "--port", "0", "--api-keys", keysFile,
                "--parent-pid", String(process.pid)];
  if (model !== undefined) args.push("--model", model);
  if (weights !== undefined) args.push("--weights", weights);
  args.push(...(options.args ?? []));
  const shown = [program, ...args.filter((a) => a !== keysFile)].join(" ");

  const child = spawn(program, args, { stdio: ["ignore", "ignore", "pipe"] });
  const stopOnExit = (): void => { child.kill("SIGTERM"); };
  process.once("exit", stopOnExit);
  const tail: string[] = [];
  let url: string;
  try {
    url = await waitForUrl(child, tail, shown, options.startTimeoutMs ?? 300_000);
    await waitForHealth(url, child, shown, options.startTimeoutMs ?? 300_000);
  } catch (e) {
    child.kill("SIGTERM");
    process.removeListener("exit", stopOnExit);
    throw e;
  } finally {
    await forget(); // read at start: the key now lives only in this process and the child
  }
  // Keep draining its stderr (a full pipe would block it), but let this process exit without it.
  child.stderr?.resume();
  (child.stderr as unknown as { unref?: () => void } | null)?.unref?.();
  child.unref();

  const stop = async (): Promise<void> => {
    process.removeListener("exit", stopOnExit);
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  };
  const found: FoundRuntime = { info: { url, source: "local" }, apiKey: key };
  if (child.pid !== undefined) found.info.pid = child.pid;
  return { found, child, users: 0, stop };
}

/** The URL from the line `realm-nb serve` prints once it listens; its last lines on failure. */
function waitForUrl(child: ChildProcess, tail: string[], shown: string,
                    timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    let partial = "";
    const timer = setTimeout(() => fail(`it did not start within ${timeoutMs / 1000} s`),
                             timeoutMs);
    const fail = (why: string, cause?: unknown): void => {
      cleanup();
      const last = tail.length ? `; its last output:\n  ${tail.join("\n  ")}` : "";
      reject(new ServerConnectionError(
        `could not start a local realm-nb runtime (\`${shown}\`): ${why}${last}. Install the ` +
          "Python package (pip install realm-nb), pass local.command, or connect to a running " +
          "runtime with endpoint", { param: "mode", cause }));
    };
    const onData = (chunk: Buffer): void => {
      const lines = (partial + chunk.toString("utf8")).split(/\r?\n|\r/);
      partial = lines.pop() ?? "";
      for (const line of lines) {
        if (line.trim()) tail.push(line.trim());
        if (tail.length > TAIL_LINES) tail.shift();
        const m = READY.exec(line);
        if (m?.[1] !== undefined) {
          cleanup();
          resolve(baseUrl(m[1]));
          return;
        }
      }
    };
    const onError = (e: Error): void => fail(e.message, e); // e.g. ENOENT: no such program
    const onExit = (code: number | null, signal: string | null): void =>
      fail(`it exited (${signal ?? `code ${code}`})`);
    const cleanup = (): void => {
      clearTimeout(timer);
      child.stderr?.off("data", onData);
      child.off("error", onError);
      child.off("exit", onExit);
    };
    child.stderr?.on("data", onData);
    child.once("error", onError);
    child.once("exit", onExit);
  });
}

/** Uvicorn listens a moment after the line is printed: wait until `/health` answers. */
async function waitForHealth(url: string, child: ChildProcess, shown: string,
                             timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const r = await fetch(`${url}/health`);
      if (r.ok) return;
    } catch {
      // not listening yet
    }
    if (child.exitCode !== null || Date.now() > deadline) {
      throw new ServerConnectionError(
        `the local realm-nb runtime (\`${shown}\`) printed ${url} but ` +
          (child.exitCode !== null ? `exited (code ${child.exitCode})` : "never answered there"),
        { param: "mode" });
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
