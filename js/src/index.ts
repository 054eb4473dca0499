/**
 * realm-nb for JavaScript and TypeScript: the Python SDK's `Realm` in Node and the browser.
 *
 * ```ts
 * import { Realm } from "realm-nb";
 * const realm = new Realm({ endpoint: "http://127.0.0.1:8080", apiKey: "sk-alice" });
 * const g = await realm.generate({ prompt: "The capital of France is", maxTokens: 16 });
 * for await (const piece of realm.generate({ prompt: "Once upon a time", stream: true })) { ... }
 * ```
 */

export { DEFAULT_MODEL, Realm } from "./realm.js";
export type { RealmOptions } from "./realm.js";
export { GenerationStream } from "./stream.js";
export type { LocalRuntimeOptions } from "./local.js";
export type { RuntimeInfo } from "./runtime.js";
export * from "./errors.js";
export type {
  ChatMessage, ChatOptions, CallOptions, FinishReason, Generation, GenerateOptions, Mode,
  ModelInfo, Progress, RequestOptions, SamplingOptions, SamplingParams, TenantStats, Timings,
  TokenLogprob, TopLogprob, Usage, WeightLayout,
} from "./types.js";
