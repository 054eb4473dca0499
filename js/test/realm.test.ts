/**
 * Realm against a real `realm-nb serve` on loopback (the real model, short generations), with
 * the Python SDK as the reference for what the same runtime answers.
 */

import assert from "node:assert/strict";
import { execFile, spawnSync } from "node:child_process";
import { mkdtemp, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  AuthenticationError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError, Realm,
  RealmError, ServerConnectionError,
} from "realm-nb";

import { metric, python, startServer, TENANT, waitFor } from "./helpers.js";
import type { TestServer } from "./helpers.js";

const PROMPT = "The capital of France is";
const QUESTION = "What is the capital of France?";
const N = 12;
const LONG = { prompt: "1, 2, 3, 4,", // greedy: it counts on, well past maxTokens
               maxTokens: 400, temperature: 0 } as const;

let server: TestServer;
let realm: Realm;
let reference: { generate: { text: string; token_ids: number[] };
                 chat: { text: string; token_ids: number[] } };

before(async () => {
  server = await startServer();
  realm = new Realm({ mode: "server", endpoint: server.url, apiKey: server.key });
  // The Python SDK, against the same server: the reference greedy output.
  const out = await python(`
import json, os
from realm_nb import Realm
r = Realm(mode="server", endpoint=os.environ["JS_TEST_URL"], api_key=os.environ["JS_TEST_KEY"])
g = r.generate(os.environ["JS_TEST_PROMPT"], max_tokens=${N}, temperature=0)
c = r.chat([{"role": "user", "content": os.environ["JS_TEST_QUESTION"]}], max_tokens=${N},
           temperature=0)
print(json.dumps({"generate": {"text": g.text, "token_ids": g.token_ids},
                  "chat": {"text": c.text, "token_ids": c.token_ids}}))`,
  { JS_TEST_URL: server.url, JS_TEST_KEY: server.key, JS_TEST_PROMPT: PROMPT,
    JS_TEST_QUESTION: QUESTION });
  reference = JSON.parse(out) as typeof reference;
}, { timeout: 240_000 });

after(async () => {
  await server?.stop();
});

const isAbort = (e: unknown): boolean => e instanceof Error && e.name === "AbortError";

/** The first piece of a stream (it keeps running). */
async function firstPiece(stream: AsyncIterable<string>): Promise<string> {
  const it = stream[Symbol.asyncIterator]();
  const r = await it.next();
  assert.equal(r.done, false, "the stream ended before its first piece");
  return r.value as string;
}

describe("generation", { timeout: 120_000 }, () => {
  it("greedy generate equals the Python SDK's text and token ids", async () => {
    const g = await realm.generate({ prompt: PROMPT, maxTokens: N, temperature: 0 });
    assert.ok(reference.generate.text.length > 0);
    assert.equal(g.text, reference.generate.text);
    assert.deepEqual(g.tokenIds, reference.generate.token_ids);
    assert.equal(g.finishReason, "length");
    assert.equal(g.usage.completionTokens, N);
    assert.equal(g.tenant, TENANT);
  });

  it("greedy chat equals the Python SDK's", async () => {
    const g = await realm.chat([{ role: "user", content: QUESTION }],
                               { maxTokens: N, temperature: 0 });
    assert.ok(reference.chat.text.length > 0);
    assert.equal(g.text, reference.chat.text);
    assert.deepEqual(g.tokenIds, reference.chat.token_ids);
  });

  it("streams pieces before the end, which add up to the same greedy text", async () => {
    const stream = realm.generate({ prompt: PROMPT, maxTokens: N, temperature: 0, stream: true });
    const seen: { piece: string; ended: boolean }[] = [];
    for await (const piece of stream) seen.push({ piece, ended: stream.generation !== null });
    const g = await stream.result();
    assert.ok(seen.length >= 2, `only ${seen.length} piece(s)`);
    assert.equal(seen[0]?.ended, false, "the first piece came only after the whole result");
    assert.equal(seen.map((s) => s.piece).join(""), g.text);
    assert.equal(g.text, reference.generate.text);
  });

  it("reproduces a sampled generation from the seed it reports", async () => {
    const sampled = { prompt: "Once upon a time", maxTokens: 8, temperature: 0.9 };
    const first = await realm.generate(sampled);
    const seed = first.params?.seed;
    assert.ok(seed !== undefined && seed !== null);
    const again = await realm.generate({ ...sampled, seed });
    assert.equal(again.params?.seed, seed);
    assert.equal(again.text, first.text);
  });
});

describe("stopping a generation", { timeout: 120_000 }, () => {
  it("an AbortSignal ends the request and the runtime frees its slot (/metrics)", async () => {
    const cancelledBefore = await metric(server, "realm_cancelled_total");
    const tokensBefore = await metric(server, "realm_tokens_total");
    const controller = new AbortController();
    const stream = realm.generate({ ...LONG, stream: true, signal: controller.signal });
    const pieces: string[] = [];
    await assert.rejects(async () => {
      for await (const piece of stream) {
        pieces.push(piece);
        if (pieces.length === 2) controller.abort();
      }
    }, isAbort);
    await assert.rejects(stream.result(), isAbort);
    await waitFor(async () => await metric(server, "realm_cancelled_total") === cancelledBefore + 1,
                  15_000, "realm_cancelled_total to count the aborted generation");
    assert.equal(await metric(server, "realm_running_requests"), 0);
    assert.equal((await realm.stats()).running, 0);
    const spent = await metric(server, "realm_tokens_total") - tokensBefore;
    assert.ok(spent < LONG.maxTokens, `the aborted generation ran on (${spent} tokens)`);
  });

  it("stream.cancel() stops it and result() is the partial generation", async () => {
    const stream = realm.generate({ ...LONG, stream: true });
    await firstPiece(stream);
    await stream.cancel();
    const g = await stream.result();
    assert.equal(g.finishReason, "cancelled");
    assert.ok(g.tokenIds.length >= 1 && g.tokenIds.length < LONG.maxTokens);
    assert.equal(stream.pieces.join(""), g.text);
  });

  it("leaving a for-await loop early cancels the generation", async () => {
    const stream = realm.generate({ ...LONG, stream: true });
    for await (const piece of stream) {
      assert.equal(typeof piece, "string");
      break;
    }
    const g = await stream.result();
    assert.equal(g.finishReason, "cancelled");
  });

  it("realm.cancel() stops this tenant's running generations", async () => {
    const stream = realm.generate({ ...LONG, stream: true });
    await firstPiece(stream);
    assert.equal(await realm.cancel(), 1);
    assert.equal((await stream.result()).finishReason, "cancelled");
    assert.equal(await realm.cancel(), 0);
  });
});

describe("models, stats and errors", { timeout: 60_000 }, () => {
  it("lists the loaded model; loadModel returns its id; useModel checks it exists", async () => {
    const models = await realm.models();
    const smol = models.find((m) => m.name === "smollm2-135m");
    assert.ok(smol?.loaded);
    const admin = new Realm({ endpoint: server.url, apiKey: server.adminKey }); // admins load
    assert.equal(await admin.loadModel("smollm2-135m"), smol.id);
    const other = new Realm({ endpoint: server.url, apiKey: server.key, defaultModel: "nope" });
    assert.equal((await other.useModel(smol.id)).name, "smollm2-135m");
    assert.equal(other.model, "smollm2-135m");
    await assert.rejects(other.useModel("no-such-model"), ModelNotFoundError);
    assert.equal(other.model, "smollm2-135m");
  });

  it("an unknown model gets ModelNotFoundError (404)", async () => {
    await assert.rejects(realm.generate({ prompt: PROMPT, model: "no-such-model", maxTokens: 1 }),
                         (e: unknown) => e instanceof ModelNotFoundError &&
                           e instanceof RealmError && e.status === 404 && e.param === "model");
  });

  it("a bad key gets AuthenticationError (401)", async () => {
    const bad = new Realm({ endpoint: server.url, apiKey: "sk-wrong" });
    await assert.rejects(bad.models(), (e: unknown) =>
      e instanceof AuthenticationError && e.status === 401 && e.code === "invalid_api_key");
    await assert.rejects(bad.generate({ prompt: PROMPT, maxTokens: 1 }), AuthenticationError);
  });

  it("a plain key naming another tenant gets PermissionDeniedError (403)", async () => {
    const bob = new Realm({ endpoint: server.url, apiKey: server.key, tenant: "bob" });
    await assert.rejects(bob.stats(), PermissionDeniedError);
  });

  it("bad values get the server's InvalidRequestError, unknown options the SDK's", async () => {
    await assert.rejects(realm.generate({ prompt: PROMPT, temperature: -1 }), (e: unknown) =>
      e instanceof InvalidRequestError && e.param === "temperature");
    const typo = { prompt: PROMPT, max_tokens: 4 } as unknown as { prompt: string };
    await assert.rejects(realm.generate(typo), (e: unknown) =>
      e instanceof InvalidRequestError && e.param === "max_tokens");
    assert.throws(() => realm.generate({ ...typo, stream: true }), InvalidRequestError);
  });

  it("an unreachable server gets ServerConnectionError naming its URL", async () => {
    const gone = new Realm({ endpoint: "http://127.0.0.1:9", apiKey: "x" });
    await assert.rejects(gone.models(), (e: unknown) =>
      e instanceof ServerConnectionError && e.message.includes("http://127.0.0.1:9"));
  });

  it("stats() is this tenant's view and counts its requests", async () => {
    const before = await realm.stats();
    await realm.generate({ prompt: PROMPT, maxTokens: 1, temperature: 0 });
    const now = await realm.stats();
    assert.equal(now.tenant, TENANT);
    assert.deepEqual(now.tenants.map((t) => t["id"]), [TENANT]);
    assert.equal(now.requests["requests"], (before.requests["requests"] ?? 0) + 1);
  });
});

describe("finding the runtime", { timeout: 60_000 }, () => {
  const saved = { ...process.env };
  let dir: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), "realm-nb-js-runtime-"));
    for (const name of ["REALM_NB_ENDPOINT", "REALM_ENDPOINT", "REALM_NB_API_KEY", "REALM_API_KEY",
                        "REALM_NB_RUNTIME_FILE", "JPY_SESSION_NAME"]) delete process.env[name];
    process.env["JUPYTER_RUNTIME_DIR"] = dir;
  });

  after(async () => {
    for (const name of Object.keys(process.env)) if (!(name in saved)) delete process.env[name];
    Object.assign(process.env, saved);
    await rm(dir, { recursive: true, force: true });
  });

  it("server mode with nothing to find says to pass an endpoint", async () => {
    await assert.rejects(new Realm({ mode: "server" }).models(), (e: unknown) =>
      e instanceof InvalidRequestError && e.param === "endpoint");
  });

  it("auto mode finds a Jupyter runtime file, skipping one whose owner is gone", async () => {
    const live = join(dir, "realm-nb-runtime-live.json");
    await writeFile(live, JSON.stringify({ url: `${server.url}/v1`, api_key: server.key,
                                           owner_pid: process.pid }), { mode: 0o600 });
    await utimes(live, new Date(Date.now() - 60_000), new Date(Date.now() - 60_000));
    const gonePid = spawnSync(process.execPath, ["-e", ""]).pid; // exited and reaped
    await writeFile(join(dir, "realm-nb-runtime-stale.json"), // newer, so looked at first
                    JSON.stringify({ url: "http://127.0.0.1:9", api_key: "x",
                                     owner_pid: gonePid }));
    const found = new Realm();
    const info = await found.runtime();
    assert.deepEqual(info,
                     { url: server.url, source: "runtime-file", file: live, pid: process.pid });
    assert.equal((await found.stats()).tenant, TENANT);
  });
});

describe("the example", { timeout: 60_000 }, () => {
  it("examples/quickstart.mjs runs against the server", async () => {
    const out = await new Promise<string>((resolve, reject) => {
      execFile(process.execPath, ["examples/quickstart.mjs"],
               { env: { ...process.env, REALM_NB_ENDPOINT: server.url,
                        REALM_NB_API_KEY: server.key, QUICKSTART_MAX_TOKENS: "6" },
                 timeout: 60_000 },
               (error, stdout, stderr) => (error ? reject(new Error(`${error.message}\n${stderr}`))
                                                 : resolve(stdout)));
    });
    assert.match(out, /runtime: http:\/\/127\.0\.0\.1:\d+ \(environment\)/);
    assert.ok(out.includes(reference.generate.text.slice(0, 6)), out);
  });
});
