/**
 * What the tests share: a real `realm-nb serve` on loopback (random port, a keys file with a
 * random key; stopped by its PID), the Python SDK run as a reference, and Prometheus metrics.
 */

import { execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const TENANT = "js-test";
export const ADMIN_TENANT = "js-admin";

export interface TestServer {
  url: string;
  /** A tenant key (tenant TENANT). */
  key: string;
  /** An admin key (loads models, reads /metrics). */
  adminKey: string;
  pid: number;
  stop(): Promise<void>;
}

/** `realm-nb serve` on 127.0.0.1 with random keys (a tenant's, an admin's), ready to answer. */
export async function startServer(args: readonly string[] = []): Promise<TestServer> {
  const key = `sk-test-${randomBytes(16).toString("hex")}`;
  const adminKey = `sk-admin-${randomBytes(16).toString("hex")}`;
  const dir = await mkdtemp(join(tmpdir(), "realm-nb-js-test-"));
  const keys = join(dir, "keys.toml");
  await writeFile(keys, `[keys."${key}"]\ntenant = "${TENANT}"\n\n` +
                        `[keys."${adminKey}"]\ntenant = "${ADMIN_TENANT}"\nrole = "admin"\n`,
                  { mode: 0o600 });
  const child = spawn("realm-nb", ["serve", "--host", "127.0.0.1", "--port", "0",
                                   "--api-keys", keys, ...args],
                      { stdio: ["ignore", "ignore", "pipe"] });
  const pid = child.pid;
  if (pid === undefined) throw new Error("could not spawn realm-nb serve");
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) process.kill(pid, "SIGTERM");
    await exited;
    await rm(dir, { recursive: true, force: true });
  };
  let err = "";
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve did not start:\n${err}`)), 180_000);
    child.stderr.on("data", (chunk: Buffer) => {
      err += chunk.toString();
      const m = /serving .* at (http:\/\/\S+?)\/v1 /.exec(err);
      if (m?.[1]) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.once("exit", (code) => reject(new Error(`serve exited (${code}):\n${err}`)));
  }).catch(async (e: unknown) => {
    await stop();
    throw e;
  });
  child.stderr.resume();
  await waitFor(async () => (await fetch(`${url}/health`).catch(() => null))?.ok === true,
                30_000, "the server's /health");
  return { url, key, adminKey, pid, stop };
}

/** Run Python code (the Python SDK as a reference); resolves to its stdout. */
export function python(code: string, env: Record<string, string> = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(process.env["PYTHON"] ?? "python", ["-c", code],
             { env: { ...process.env, ...env }, timeout: 120_000 },
             (error, stdout, stderr) => (error ? reject(new Error(`${error.message}\n${stderr}`))
                                              : resolve(stdout)));
  });
}

/** One of the server's Prometheus metrics (summed over its label sets), read as an admin. */
export async function metric(server: TestServer, name: string): Promise<number> {
  const response = await fetch(`${server.url}/metrics`,
                               { headers: { Authorization: `Bearer ${server.adminKey}` } });
  if (!response.ok) throw new Error(`GET /metrics: HTTP ${response.status}`);
  const text = await response.text();
  let total = 0;
  for (const line of text.split("\n")) {
    const m = /^([a-zA-Z_:][\w:]*)(\{[^}]*\})? (\S+)$/.exec(line);
    if (m !== null && m[1] === name) total += Number(m[3]);
  }
  return total;
}

export async function waitFor(check: () => Promise<boolean> | boolean, timeoutMs: number,
                              what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Whether a process runs (a zombie, dead but not yet reaped by its new parent, does not). */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return true; // no /proc (not Linux): kill(0) has answered
  }
}
