/**
 * GenerationStream over a scripted server (a `fetch` that answers with chosen SSE bytes): the
 * event kinds a live server rarely shows on demand (progress, a mid-stream error, a cut stream).
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { GuestTrap, Realm, ServerConnectionError } from "realm-nb";
import type { Progress } from "realm-nb";

const GENERATION = {
  text: " Paris.", token_ids: [7042, 30], prompt: "The capital of France is",
  prompt_ids: [504, 3575, 282, 4649, 314], finish_reason: "length", model: "smollm2-135m",
  usage: { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 },
  timings: { prompt_ms: 10, ttft_ms: 11, decode_ms: 5, total_ms: 16, tokens_per_s: 200 },
  logprobs: [{ token_id: 7042, logprob: -0.5, token: " Paris",
               top: [{ token_id: 7042, logprob: -0.5, token: " Paris" }] },
             { token_id: 30, logprob: -0.1, token: ".", top: [] }],
  params: { max_tokens: 2, temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05,
            repeat_penalty: 1, repeat_window: 64, seed: "SEED", stop: [] },
  tenant: "alice",
};
const SEED = "18446744073709551557"; // a u64 past 2**53

function sse(...events: unknown[]): string {
  return events.map((e) => `data: ${typeof e === "string" ? e : JSON.stringify(e)}\n\n`).join("")
    .replace('"SEED"', SEED);
}

/** A Realm whose fetch answers the generate call with `body`, cut into 7-byte chunks. */
function scripted(body: string): { realm: Realm; requests: { url: string; body: string }[] } {
  const requests: { url: string; body: string }[] = [];
  const fetch = async (url: string | URL | Request, init?: RequestInit): Promise<Response> => {
    requests.push({ url: String(url), body: String(init?.body ?? "") });
    const bytes = new TextEncoder().encode(body);
    let at = 0;
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (at >= bytes.length) return controller.close();
        controller.enqueue(bytes.slice(at, at + 7));
        at += 7;
      },
    });
    return new Response(stream, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  const realm = new Realm({ endpoint: "http://realm.test/v1", apiKey: "sk-x", fetch });
  return { realm, requests };
}

describe("GenerationStream over scripted SSE", () => {
  it("reports progress, yields pieces, and returns the whole Generation in camelCase", async () => {
    const { realm, requests } = scripted(sse(
      { request_id: "req-1", model: "smollm2-135m" },
      { progress: { stage: "loading", model: "smollm2-135m", done: 15, total: 30 } },
      { progress: { stage: "compiling", model: "smollm2-135m" } },
      { text: " Paris" }, { text: "." }, { generation: GENERATION }, "[DONE]"));
    const progress: Progress[] = [];
    const stream = realm.generate({ prompt: "The capital of France is", maxTokens: 2, stop: "\n",
                                    logprobs: 1, stream: true,
                                    onProgress: (p) => progress.push(p) });
    const pieces: string[] = [];
    for await (const piece of stream) pieces.push(piece);
    const g = await stream.result();
    assert.deepEqual(progress, [{ stage: "loading", model: "smollm2-135m", done: 15, total: 30 },
                                { stage: "compiling", model: "smollm2-135m" }]);
    assert.deepEqual(pieces, [" Paris", "."]);
    assert.equal(stream.requestId, "req-1");
    assert.equal(g.text, " Paris.");
    assert.deepEqual(g.tokenIds, [7042, 30]);
    assert.deepEqual(g.usage, { promptTokens: 5, completionTokens: 2, totalTokens: 7 });
    assert.equal(g.timings.ttftMs, 11);
    assert.equal(g.logprobs?.[0]?.top[0]?.token, " Paris");
    assert.equal(g.params?.seed, BigInt(SEED));
    // what was sent: realm-nb's own call, sampling in the server's spelling, stop as a list
    assert.equal(requests[0]?.url, "http://realm.test/v1/realm/generate");
    const sent = JSON.parse(requests[0]?.body ?? "{}") as Record<string, unknown>;
    assert.deepEqual(sent["params"], { max_tokens: 2, stop: ["\n"] });
    assert.equal(sent["stream"], true);
    assert.equal(sent["logprobs"], 1);
  });

  it("sends a bigint seed as an exact integer", async () => {
    const { realm, requests } = scripted(sse({ request_id: "req-2" }, { generation: GENERATION }));
    await realm.generate({ prompt: "x", seed: BigInt(SEED) });
    assert.match(requests[0]?.body ?? "", new RegExp(`"seed":${SEED}[,}]`));
  });

  it("delivers the pieces before an error event, then rejects with the error's class", async () => {
    const { realm } = scripted(sse(
      { request_id: "req-3" }, { text: "Once" },
      { error: { message: "tenant js's guest trapped: out of fuel", type: "GuestTrap",
                 code: "guest_trap", param: null } }, "[DONE]"));
    const stream = realm.generate({ prompt: "x", stream: true });
    const pieces: string[] = [];
    await assert.rejects(async () => { for await (const p of stream) pieces.push(p); },
                         (e: unknown) => e instanceof GuestTrap && /out of fuel/.test(e.message));
    assert.deepEqual(pieces, ["Once"]);
    await assert.rejects(stream.result(), GuestTrap);
  });

  it("rejects with ServerConnectionError when the stream ends without its result", async () => {
    const { realm } = scripted(sse({ request_id: "req-4" }, { text: "Once" }));
    await assert.rejects(realm.generate({ prompt: "x" }),
                         (e: unknown) => e instanceof ServerConnectionError &&
                           /req-4/.test(e.message));
  });

  it("ends the stream with the caller's own error when onProgress throws", async () => {
    const { realm } = scripted(sse({ request_id: "req-5" }, { progress: { stage: "compiling" } },
                                   { text: "x" }, { generation: GENERATION }));
    const mine = new Error("my callback broke");
    await assert.rejects(realm.generate({ prompt: "x", onProgress: () => { throw mine; } }),
                         (e: unknown) => e === mine);
  });
});
