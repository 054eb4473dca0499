/** Local mode: a `realm-nb serve` of this process's own, and the browser's clear error. */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { before, describe, it } from "node:test";

import { InvalidRequestError, Realm } from "realm-nb";
import type { RuntimeInfo } from "realm-nb";

import { pidAlive, waitFor } from "./helpers.js";

interface Report {
  first: RuntimeInfo; second: RuntimeInfo; third: RuntimeInfo;
  aliveAfterOneClose: boolean; modelsAfterOneClose: string[]; stoppedAfterLastClose: boolean;
  text: string; tenant: string; statsTenant: string; stages: string[];
}

describe("local mode in Node", { timeout: 240_000 }, () => {
  let report: Report;
  let childExited = false;

  before(async () => {
    const script = fileURLToPath(new URL("./fixtures/local-child.js", import.meta.url));
    const env: Record<string, string | undefined> = { ...process.env };
    delete env["REALM_NB_ENDPOINT"];
    delete env["REALM_NB_API_KEY"];
    const out = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, [script], { env, timeout: 200_000 },
               (error, stdout, stderr) => (error ? reject(new Error(`${error.message}\n${stderr}`))
                                                 : resolve(stdout)));
    });
    childExited = true;
    report = JSON.parse(out) as Report;
  }, { timeout: 240_000 });

  it("starts `realm-nb serve` on loopback, shared by the process's Realms", () => {
    assert.equal(report.first.source, "local");
    assert.match(report.first.url, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(typeof report.first.pid, "number");
    assert.deepEqual(report.second, report.first);
  });

  it("stops the runtime when the last Realm using it closes, not before", () => {
    assert.equal(report.aliveAfterOneClose, true);
    assert.ok(report.modelsAfterOneClose.includes("smollm2-135m"));
    assert.equal(report.stoppedAfterLastClose, true);
  });

  it("then behaves as server mode: generation, cold-start progress, a named tenant", () => {
    assert.notEqual(report.third.pid, report.first.pid);
    assert.ok(report.text.length > 0);
    assert.ok(report.stages.includes("loading"), `stages: ${report.stages.join(", ")}`);
    assert.equal(report.tenant, "notebook.ipynb");
    assert.equal(report.statsTenant, "notebook.ipynb");
  });

  it("stops the runtime when the process that started it exits", async () => {
    assert.ok(childExited);
    const pid = report.third.pid ?? -1;
    await waitFor(() => !pidAlive(pid), 20_000, `the local runtime (pid ${pid}) to stop`);
  });
});

describe("the constructor", () => {
  it("refuses an unknown mode, an unknown weight layout, and an endpoint for local mode", () => {
    const bad = [{ mode: "remote" }, { weights: "q4" }, { mode: "local", endpoint: "http://x:1" }];
    for (const options of bad) {
      assert.throws(() => new Realm(options as ConstructorParameters<typeof Realm>[0]),
                    InvalidRequestError, JSON.stringify(options));
    }
  });
});

describe("in a browser", () => {
  /** Construct a Realm as a browser would: no `process` global. */
  function withoutProcess<T>(fn: () => T): T {
    const saved = Object.getOwnPropertyDescriptor(globalThis, "process");
    assert.ok(saved?.configurable, "globalThis.process cannot be hidden here");
    Object.defineProperty(globalThis, "process", { value: undefined, configurable: true });
    try {
      return fn();
    } finally {
      Object.defineProperty(globalThis, "process", saved);
    }
  }

  it("local mode throws a clear error that says which endpoint to pass", () => {
    const e = withoutProcess(() => {
      try {
        new Realm({ mode: "local" });
      } catch (err) {
        return err;
      }
      return null;
    });
    assert.ok(e instanceof InvalidRequestError);
    assert.match(e.message, /browser/);
    assert.match(e.message, /endpoint: "http:\/\/127\.0\.0\.1:8080"/);
  });

  it("server mode with an endpoint is fine", () => {
    const realm = withoutProcess(() => new Realm({ endpoint: "http://127.0.0.1:8080" }));
    assert.equal(realm.mode, "auto");
  });
});
