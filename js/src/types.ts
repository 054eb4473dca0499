/**
 * The values that cross the SDK: options in, generations and model listings out.
 *
 * They mirror the Python SDK's `realm_nb.types` (`SamplingParams`, `Generation`, `ModelInfo`) in
 * JavaScript's spelling (camelCase). The `...FromWire` / `...ToWire` functions are the one place
 * where the server's snake_case JSON is translated.
 */

import { InvalidRequestError } from "./errors.js";

export type Mode = "local" | "server" | "auto";
export type WeightLayout = "exact" | "fast" | "packed";
export const WEIGHT_LAYOUTS: readonly WeightLayout[] = ["exact", "fast", "packed"];
export type FinishReason = "stop" | "length" | "cancelled";

/** How the guest picks each token; left out, the runtime's defaults apply (as in Python). */
export interface SamplingOptions {
  /** Most tokens to generate (default 128). */
  maxTokens?: number | undefined;
  /** 0 is greedy (default 0.8). */
  temperature?: number | undefined;
  topK?: number | undefined;
  topP?: number | undefined;
  minP?: number | undefined;
  repeatPenalty?: number | undefined;
  repeatWindow?: number | undefined;
  /** A u64: pass a `bigint` past 2**53 (a generation's `params.seed` may be one). */
  seed?: number | bigint | null | undefined;
  /** Stop strings (up to 16); the text ends before the first one found. */
  stop?: string | readonly string[] | undefined;
}

/** A cold-start event (`{stage: "loading", done, total}`, `{stage: "compiling"}`). */
export interface Progress {
  stage: string;
  model?: string;
  done?: number;
  total?: number;
}

export interface RequestOptions {
  /** Aborting it ends the request; the runtime cancels the generation and frees its slot. */
  signal?: AbortSignal | undefined;
}

export interface CallOptions extends SamplingOptions, RequestOptions {
  /** A model name, alias or id (default: the Realm's model). */
  model?: string | undefined;
  /** Also score the likeliest `logprobs` alternatives of every generated token (0..20). */
  logprobs?: number | undefined;
  /** Cold-start events, before the first piece of text. */
  onProgress?: ((progress: Progress) => void) | undefined;
  /** true: an async iterable of text pieces (`GenerationStream`) instead of a promise. */
  stream?: boolean | undefined;
}

export interface GenerateOptions extends CallOptions {
  /** Text, or token ids. */
  prompt: string | readonly number[];
  /** Score the prompt too (with `logprobs`): its tokens come first in `logprobs`. */
  echo?: boolean | undefined;
}

export type ChatOptions = CallOptions;

export interface ChatMessage {
  role: "system" | "user" | "assistant" | (string & {});
  content: string;
}

export interface TopLogprob {
  tokenId: number;
  logprob: number;
  token: string;
}

/** One scored position: the token there, its logprob, and the likeliest alternatives. */
export interface TokenLogprob extends TopLogprob {
  top: TopLogprob[];
}

export interface Usage {
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
}

export interface Timings {
  promptMs: number;
  /** Time to first token. */
  ttftMs: number;
  decodeMs: number;
  totalMs: number;
  tokensPerS: number;
}

/** The sampling parameters a generation ran with (the seed it drew included). */
export interface SamplingParams {
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repeatPenalty: number;
  repeatWindow: number;
  seed: number | bigint | null;
  stop: string[];
}

/** The result of one generate/chat call, the same as the Python SDK's `Generation`. */
export interface Generation {
  text: string;
  tokenIds: number[];
  prompt: string | number[];
  promptIds: number[];
  finishReason: FinishReason;
  model: string;
  usage: Usage;
  timings: Timings;
  logprobs: TokenLogprob[] | null;
  params: SamplingParams | null;
  tenant: string;
}

/** One model the runtime knows: a catalogue name, a loaded file, or both. */
export interface ModelInfo {
  /** Content id (a hash prefix of the file). */
  id: string;
  name: string;
  /** Where the file is on the server: given to admin keys only (null for others). */
  path: string | null;
  arch: string | null;
  quant: string | null;
  sizeBytes: number | null;
  loaded: boolean;
  weights: string | null;
  aliases: string[];
}

/** `GET /v1/stats`: this tenant's view (every tenant's for a key that speaks for many). */
export interface TenantStats {
  tenant: string;
  tenants: Record<string, unknown>[];
  store: Record<string, unknown>;
  schedulers: Record<string, Record<string, number>>;
  requests: Record<string, number>;
  /** This tenant's running requests. */
  running: number;
}

// ------------------------------------------------------------------------------ to the server

const SAMPLING_WIRE: Record<keyof SamplingOptions, string> = {
  maxTokens: "max_tokens", temperature: "temperature", topK: "top_k", topP: "top_p",
  minP: "min_p", repeatPenalty: "repeat_penalty", repeatWindow: "repeat_window", seed: "seed",
  stop: "stop",
};
const CALL_KEYS = ["model", "logprobs", "onProgress", "stream", "signal"];

/**
 * The `params` object of `/v1/realm/generate` from the caller's options; an unknown option (a
 * typo, or Python's `max_tokens`) is an InvalidRequestError rather than silently ignored.
 */
export function samplingToWire(options: object,
                               extraKeys: readonly string[]): Record<string, unknown> {
  const known = new Set<string>([...Object.keys(SAMPLING_WIRE), ...CALL_KEYS, ...extraKeys]);
  const unknown = Object.keys(options).filter((k) => !known.has(k)).sort();
  if (unknown.length > 0) {
    throw new InvalidRequestError(
      `unknown option(s) ${unknown.join(", ")}; sampling options are ` +
        `${Object.keys(SAMPLING_WIRE).join(", ")}`, { param: unknown[0] });
  }
  const params: Record<string, unknown> = {};
  for (const [key, wire] of Object.entries(SAMPLING_WIRE)) {
    const value = (options as Record<string, unknown>)[key];
    if (value === undefined) continue;
    params[wire] = key === "stop" && typeof value === "string" ? [value] : value;
  }
  return params;
}

// ------------------------------------------------------------------------------ from the server

type Wire = Record<string, unknown>;

const num = (x: unknown, fallback = 0): number => (typeof x === "number" ? x : fallback);
const str = (x: unknown): string | null => (typeof x === "string" ? x : null);
const record = (x: unknown): Wire => (typeof x === "object" && x !== null ? (x as Wire) : {});

function topFromWire(t: Wire): TopLogprob {
  return { tokenId: num(t["token_id"]), logprob: num(t["logprob"]), token: str(t["token"]) ?? "" };
}

function paramsFromWire(p: Wire): SamplingParams {
  const seed = p["seed"];
  return {
    maxTokens: num(p["max_tokens"]), temperature: num(p["temperature"]), topK: num(p["top_k"]),
    topP: num(p["top_p"]), minP: num(p["min_p"]), repeatPenalty: num(p["repeat_penalty"]),
    repeatWindow: num(p["repeat_window"]),
    seed: typeof seed === "number" || typeof seed === "bigint" ? seed : null,
    stop: Array.isArray(p["stop"]) ? p["stop"].map(String) : [],
  };
}

/** A `Generation` from the server's `generation.to_dict()`. */
export function generationFromWire(g: Wire): Generation {
  const usage = record(g["usage"]);
  const timings = record(g["timings"]);
  const logprobs = g["logprobs"];
  const params = g["params"];
  return {
    text: str(g["text"]) ?? "",
    tokenIds: Array.isArray(g["token_ids"]) ? g["token_ids"].map(Number) : [],
    prompt: typeof g["prompt"] === "string" ? g["prompt"]
      : Array.isArray(g["prompt"]) ? g["prompt"].map(Number) : "",
    promptIds: Array.isArray(g["prompt_ids"]) ? g["prompt_ids"].map(Number) : [],
    finishReason: (str(g["finish_reason"]) ?? "stop") as FinishReason,
    model: str(g["model"]) ?? "",
    usage: {
      promptTokens: num(usage["prompt_tokens"]),
      completionTokens: num(usage["completion_tokens"]),
      totalTokens: num(usage["total_tokens"]),
    },
    timings: {
      promptMs: num(timings["prompt_ms"]), ttftMs: num(timings["ttft_ms"]),
      decodeMs: num(timings["decode_ms"]), totalMs: num(timings["total_ms"]),
      tokensPerS: num(timings["tokens_per_s"]),
    },
    logprobs: Array.isArray(logprobs)
      ? logprobs.map((e: Wire) => ({
        ...topFromWire(e),
        top: Array.isArray(e["top"]) ? e["top"].map((t: Wire) => topFromWire(t)) : [],
      }))
      : null,
    params: params === null || params === undefined ? null : paramsFromWire(record(params)),
    tenant: str(g["tenant"]) ?? "default",
  };
}

/** One row of `GET /v1/models` (OpenAI's model object plus realm-nb's fields). */
export function modelFromWire(m: Wire): ModelInfo {
  return {
    id: str(m["content_id"]) ?? str(m["id"]) ?? "",
    name: str(m["id"]) ?? "",
    path: str(m["path"]),
    arch: str(m["arch"]),
    quant: str(m["quant"]),
    sizeBytes: typeof m["size"] === "number" ? m["size"] : null,
    loaded: m["loaded"] === true,
    weights: str(m["weights"]),
    aliases: Array.isArray(m["aliases"]) ? m["aliases"].map(String) : [],
  };
}

export function progressFromWire(p: Wire): Progress {
  const out: Progress = { stage: str(p["stage"]) ?? "unknown" };
  const model = str(p["model"]);
  if (model !== null) out.model = model;
  if (typeof p["done"] === "number") out.done = p["done"];
  if (typeof p["total"] === "number") out.total = p["total"];
  return out;
}
