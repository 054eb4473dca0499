/**
 * Finding the runtime to talk to, as the Python SDK's `realm_nb.runtime` does, in order:
 *
 * 1. `REALM_NB_ENDPOINT` (or `REALM_ENDPOINT`), with `REALM_NB_API_KEY` / `REALM_API_KEY`;
 * 2. the runtime file named by `REALM_NB_RUNTIME_FILE` (set by the Jupyter server extension);
 * 3. the newest live `realm-nb-runtime-*.json` in Jupyter's runtime dir.
 *
 * A runtime file is JSON `{url, api_key, owner_pid}`; its key may name tenants (`X-Realm-Tenant`).
 * Only Node has environment variables and files: in a browser nothing is found. Node's modules are
 * imported lazily through `nodeModule`, whose specifier bundlers do not follow, so this module
 * costs a browser bundle nothing.
 */

export const ENDPOINT_ENVS = ["REALM_NB_ENDPOINT", "REALM_ENDPOINT"] as const;
export const API_KEY_ENVS = ["REALM_NB_API_KEY", "REALM_API_KEY"] as const;
export const RUNTIME_FILE_ENV = "REALM_NB_RUNTIME_FILE";
const RUNTIME_FILE = /^realm-nb-runtime-.*\.json$/;
const MAX_TENANT_CHARS = 128;

/** Where a Realm's runtime listens, and how it was found (never the key). */
export interface RuntimeInfo {
  url: string;
  /** "endpoint": given; "environment": REALM_NB_ENDPOINT; "runtime-file": a Jupyter server's
   * runtime; "local": a `realm-nb serve` this process started. */
  source: "endpoint" | "environment" | "runtime-file" | "local";
  /** The runtime file read (source "runtime-file"). */
  file?: string;
  /** The runtime's process id, where known (its owner's for a runtime file). */
  pid?: number;
}

/** A runtime found, with the key to use (kept apart from `RuntimeInfo`, which may be shown). */
export interface FoundRuntime {
  info: RuntimeInfo;
  apiKey: string | undefined;
}

/** True in Node (and runtimes that emulate it), false in a browser. */
export function isNode(): boolean {
  const p = (globalThis as { process?: { versions?: { node?: unknown } } }).process;
  return typeof p?.versions?.node === "string";
}

/** A Node built-in, imported so that browser bundlers leave it alone. */
export async function nodeModule<T>(name: string): Promise<T> {
  return (await import(/* webpackIgnore: true */ /* @vite-ignore */ name)) as T;
}

/** The first non-empty variable of `names` (undefined in a browser). */
export function envValue(names: readonly string[]): string | undefined {
  if (!isNode()) return undefined;
  for (const name of names) {
    const value = process.env[name]?.trim();
    if (value) return value;
  }
  return undefined;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as { code?: string }).code === "EPERM"; // alive, another user's
  }
}

type Fs = typeof import("node:fs/promises");
type Path = typeof import("node:path");
type Os = typeof import("node:os");

async function readRuntimeFile(fs: Fs, file: string): Promise<FoundRuntime | null> {
  let data: Record<string, unknown>;
  try {
    data = JSON.parse(await fs.readFile(file, "utf8")) as Record<string, unknown>;
  } catch {
    return null;
  }
  const { url, api_key: key, owner_pid: owner } = data;
  if (typeof url !== "string" || (owner != null && typeof owner !== "number")) return null;
  if (typeof owner === "number" && !pidAlive(owner)) return null;
  const info: RuntimeInfo = { url, source: "runtime-file", file };
  if (typeof owner === "number") info.pid = owner;
  return { info, apiKey: typeof key === "string" ? key : undefined };
}

/** Jupyter's runtime dir, as `jupyter_core.paths.jupyter_runtime_dir` finds it. */
function jupyterRuntimeDir(path: Path, os: Os): string {
  const env = process.env;
  if (env["JUPYTER_RUNTIME_DIR"]) return env["JUPYTER_RUNTIME_DIR"];
  if (env["JUPYTER_DATA_DIR"]) return path.join(env["JUPYTER_DATA_DIR"], "runtime");
  const home = os.homedir();
  if (process.platform === "darwin") return path.join(home, "Library", "Jupyter", "runtime");
  if (process.platform === "win32") {
    return path.join(env["APPDATA"] ?? path.join(home, "AppData", "Roaming"), "jupyter", "runtime");
  }
  const data = env["XDG_DATA_HOME"] || path.join(home, ".local", "share");
  return path.join(data, "jupyter", "runtime");
}

/** The runtime this process should use, or null (Node only; null in a browser). */
export async function findRuntime(): Promise<FoundRuntime | null> {
  if (!isNode()) return null;
  const url = envValue(ENDPOINT_ENVS);
  if (url) return { info: { url, source: "environment" }, apiKey: envValue(API_KEY_ENVS) };
  const fs = await nodeModule<Fs>("node:fs/promises");
  const named = process.env[RUNTIME_FILE_ENV];
  if (named) {
    const found = await readRuntimeFile(fs, named);
    if (found !== null) return found;
  }
  const path = await nodeModule<Path>("node:path");
  const dir = jupyterRuntimeDir(path, await nodeModule<Os>("node:os"));
  let names: string[];
  try {
    names = (await fs.readdir(dir)).filter((n) => RUNTIME_FILE.test(n));
  } catch {
    return null;
  }
  const files = await Promise.all(names.map(async (n) => {
    const file = path.join(dir, n);
    const mtime = await fs.stat(file).then((s) => s.mtimeMs, () => 0);
    return { file, mtime };
  }));
  files.sort((a, b) => b.mtime - a.mtime);
  for (const { file } of files) {
    const found = await readRuntimeFile(fs, file);
    if (found !== null) return found;
  }
  return null;
}

/** This notebook's tenant name (Jupyter sets JPY_SESSION_NAME), home shortened to "~". */
export function notebookTenant(): string | undefined {
  if (!isNode()) return undefined;
  let path = process.env["JPY_SESSION_NAME"]?.trim();
  if (!path) return undefined;
  const home = process.env["HOME"] ?? "";
  if (home !== "" && home !== "/" && path.startsWith(home + "/")) {
    path = "~" + path.slice(home.length);
  }
  return path.slice(-MAX_TENANT_CHARS);
}
