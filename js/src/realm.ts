/**
 * `Realm`: the JavaScript face of realm-nb, the same API as the Python SDK's `Realm`.
 *
 * Every mode talks HTTP to a runtime (the weights and the jitted host live in Python):
 * - server: the runtime at `endpoint` (else one found as in Python: REALM_NB_ENDPOINT, a Jupyter
 *   server's runtime file);
 * - local (Node): a `realm-nb serve` this process starts on loopback and stops when it exits; a
 *   browser cannot start processes, so there it is an error that says which endpoint to pass;
 * - auto (the default): server when an endpoint is given or found, else local.
 *
 * The runtime is found (or started) on the first call, so the constructor stays synchronous and
 * cheap. Calls return the types of `types.ts` and reject with the classes of `errors.ts`.
 */

import { InvalidRequestError } from "./errors.js";
import { HttpClient } from "./http.js";
import type { Fetch } from "./http.js";
import { acquireLocalRuntime, releaseLocalRuntime } from "./local.js";
import type { LocalRuntimeOptions } from "./local.js";
import { API_KEY_ENVS, envValue, findRuntime, isNode, notebookTenant } from "./runtime.js";
import type { FoundRuntime, RuntimeInfo } from "./runtime.js";
import { GenerationStream } from "./stream.js";
import { modelFromWire, samplingToWire, WEIGHT_LAYOUTS } from "./types.js";
import type {
  CallOptions, ChatMessage, ChatOptions, GenerateOptions, Generation, Mode, ModelInfo,
  RequestOptions, TenantStats, WeightLayout,
} from "./types.js";

/** The catalogue's default model, as in the Python SDK. */
export const DEFAULT_MODEL = "smollm2-135m";
const MODES: readonly Mode[] = ["local", "server", "auto"];

export interface RealmOptions {
  /** "auto" (default): server when an endpoint is given or found, else local. */
  mode?: Mode | undefined;
  /** The runtime's URL, e.g. "http://127.0.0.1:8080" (a trailing "/v1" is fine). */
  endpoint?: string | undefined;
  /** Bearer key (else REALM_NB_API_KEY in Node, else the found runtime's). */
  apiKey?: string | undefined;
  /** Model for calls that name none (else REALM_MODEL in Node, else "smollm2-135m"). */
  defaultModel?: string | undefined;
  /** Act as this tenant (X-Realm-Tenant); needs a key that may name tenants, or no keys. */
  tenant?: string | undefined;
  /** Weight layout to ask the runtime for. */
  weights?: WeightLayout | undefined;
  /** Local mode: how to start `realm-nb serve`. */
  local?: LocalRuntimeOptions | undefined;
  /** A `fetch` to use instead of the platform's (proxies, tests). */
  fetch?: Fetch | undefined;
}

interface Connection {
  http: HttpClient;
  info: RuntimeInfo;
}

export class Realm {
  /** The mode asked for ("auto" until the first call finds the runtime; see `runtime()`). */
  readonly mode: Mode;
  /** The model calls use when they name none (`useModel` changes it). */
  model: string;
  /** The tenant named in X-Realm-Tenant (undefined: the key's own tenant). */
  readonly tenant: string | undefined;
  readonly weights: WeightLayout | undefined;

  readonly #options: RealmOptions;
  #connection: Promise<Connection> | null = null;
  #ownsLocal = false;

  constructor(options: RealmOptions = {}) {
    const mode = options.mode ?? "auto";
    if (!MODES.includes(mode)) {
      throw new InvalidRequestError(`mode=${JSON.stringify(mode)}: choose "local", "server" or ` +
                                    "\"auto\"", { param: "mode" });
    }
    if (options.weights !== undefined && !WEIGHT_LAYOUTS.includes(options.weights)) {
      throw new InvalidRequestError(`weights=${JSON.stringify(options.weights)}: choose one of ` +
                                    WEIGHT_LAYOUTS.join(", "), { param: "weights" });
    }
    if (mode === "local" && options.endpoint) {
      throw new InvalidRequestError(
        `mode "local" starts a runtime of its own, so it takes no endpoint (got ` +
          `${JSON.stringify(options.endpoint)}); use mode "server" to talk to that one`,
        { param: "endpoint" });
    }
    if (!isNode() && (mode === "local" || !options.endpoint)) {
      throw new InvalidRequestError(
        `mode "${mode}" without an endpoint cannot work in a browser: it would start a ` +
          "`realm-nb serve` process (or look in Node's environment for one). Pass the URL of " +
          "a running runtime: new Realm({ mode: \"server\", endpoint: " +
          "\"http://127.0.0.1:8080\", apiKey }) for a `realm-nb serve`, or the URL your web " +
          "server proxies to it", { param: mode === "local" ? "mode" : "endpoint" });
    }
    this.mode = mode;
    this.#options = options;
    this.model = options.defaultModel || envValue(["REALM_MODEL"]) || DEFAULT_MODEL;
    this.tenant = options.tenant;
    this.weights = options.weights;
  }

  toString(): string { // never shows the key
    return `Realm(mode=${this.mode}, model=${this.model}, tenant=${this.tenant ?? "(key's)"})`;
  }

  /** Where this Realm's runtime is (finding or starting it if no call has yet). */
  async runtime(): Promise<RuntimeInfo> {
    return (await this.#connect()).info;
  }

  /** Stop using the runtime; a local runtime stops when its last Realm closes. */
  async close(): Promise<void> {
    const pending = this.#connection;
    this.#connection = null;
    await pending?.catch(() => null); // a local runtime still starting is released too
    if (this.#ownsLocal) {
      this.#ownsLocal = false;
      await releaseLocalRuntime();
    }
  }

  // ------------------------------------------------------------------ models

  /** Models the runtime knows: loaded ones, then catalogue names not loaded yet. */
  async models(options: RequestOptions = {}): Promise<ModelInfo[]> {
    const body = await this.#call("GET", "/v1/models", undefined, options.signal);
    const data = (body as { data?: unknown }).data;
    return Array.isArray(data) ? data.map((m) => modelFromWire(m as Record<string, unknown>)) : [];
  }

  /** Load a catalogue name or a .gguf file (under the server's --models-dir); returns its id. */
  async loadModel(source: string,
                  options: RequestOptions & { name?: string | undefined } = {}): Promise<string> {
    const body = { model: source, name: options.name ?? null, weights: this.weights ?? null };
    const row = await this.#call("POST", "/v1/models/load", body, options.signal);
    return modelFromWire(row as Record<string, unknown>).id;
  }

  /** Make `nameOrId` the default for later calls; rejects with ModelNotFoundError if unknown. */
  async useModel(nameOrId: string, options: RequestOptions = {}): Promise<ModelInfo> {
    if (typeof nameOrId !== "string" || !nameOrId.trim()) {
      throw new InvalidRequestError(`useModel needs a model name, got ${JSON.stringify(nameOrId)}`,
                                    { param: "model" });
    }
    const path = `/v1/models/${nameOrId.split("/").map(encodeURIComponent).join("/")}`;
    const info = modelFromWire(await this.#call("GET", path, undefined, options.signal) as
                               Record<string, unknown>);
    this.model = info.name;
    return info;
  }

  async unloadModel(name: string, options: RequestOptions = {}): Promise<ModelInfo> {
    const row = await this.#call("POST", "/v1/models/unload", { model: name }, options.signal);
    return modelFromWire(row as Record<string, unknown>);
  }

  // ------------------------------------------------------------------ generation

  /**
   * Complete `prompt` (text or token ids). Resolves to the whole `Generation`; with
   * `stream: true`, returns a `GenerationStream` of text pieces at once (`for await`,
   * `.cancel()`, `.result()`).
   */
  generate(options: GenerateOptions & { stream: true }): GenerationStream;
  generate(options: GenerateOptions & { stream?: false | undefined }): Promise<Generation>;
  generate(options: GenerateOptions): GenerationStream | Promise<Generation>;
  generate(options: GenerateOptions): GenerationStream | Promise<Generation> {
    return this.#start(options, () => {
      const prompt: unknown = options?.prompt;
      const ok = typeof prompt === "string" ||
        (Array.isArray(prompt) && prompt.every((t) => Number.isInteger(t)));
      if (!ok) {
        throw new InvalidRequestError("generate needs prompt: a string or an array of token ids",
                                      { param: "prompt" });
      }
      return { prompt, echo: options.echo ?? false,
               params: samplingToWire(options, ["prompt", "echo"]) };
    });
  }

  /** Reply to a conversation, formatted with the model's own chat template. */
  chat(messages: readonly ChatMessage[], options: ChatOptions & { stream: true }): GenerationStream;
  chat(messages: readonly ChatMessage[],
       options?: ChatOptions & { stream?: false | undefined }): Promise<Generation>;
  chat(messages: readonly ChatMessage[],
       options?: ChatOptions): GenerationStream | Promise<Generation>;
  chat(messages: readonly ChatMessage[],
       options: ChatOptions = {}): GenerationStream | Promise<Generation> {
    return this.#start(options, () => {
      if (!Array.isArray(messages) ||
          !messages.every((m) => typeof m?.role === "string" && typeof m.content === "string")) {
        throw new InvalidRequestError(
          "chat needs messages: an array of {role, content} with string content",
          { param: "messages" });
      }
      return { messages, params: samplingToWire(options, []) };
    });
  }

  #start(options: CallOptions,
         body: () => Record<string, unknown>): GenerationStream | Promise<Generation> {
    let stream: GenerationStream;
    try {
      const fields = body();
      stream = new GenerationStream(
        this.#connect().then((c) => c.http),
        { model: options.model ?? this.model, ...fields, logprobs: options.logprobs ?? null,
          weights: this.weights ?? null },
        { signal: options.signal, onProgress: options.onProgress });
    } catch (e) {
      if (options.stream) throw e; // a bad option: at once, as Python raises at the call
      return Promise.reject(e);
    }
    return options.stream ? stream : stream.result();
  }

  // ------------------------------------------------------------------ control

  /** Stop this tenant's running generations (their partial text is kept); returns how many. */
  async cancel(options: RequestOptions = {}): Promise<number> {
    const body = await this.#call("POST", "/v1/cancel", {}, options.signal);
    return Number((body as { cancelled?: unknown }).cancelled ?? 0);
  }

  /** This tenant's counters, and the runtime's store and schedulers. */
  async stats(options: RequestOptions = {}): Promise<TenantStats> {
    return await this.#call("GET", "/v1/stats", undefined, options.signal) as TenantStats;
  }

  // ------------------------------------------------------------------ the runtime

  async #call(method: "GET" | "POST", path: string, body: unknown,
              signal: AbortSignal | undefined): Promise<unknown> {
    const { http } = await this.#connect();
    return http.json(method, path, body, signal);
  }

  #connect(): Promise<Connection> {
    if (this.#connection === null) {
      this.#connection = this.#open();
      this.#connection.catch(() => { this.#connection = null; }); // tried again on the next call
    }
    return this.#connection;
  }

  async #open(): Promise<Connection> {
    const o = this.#options;
    let found: FoundRuntime | null = null;
    if (o.endpoint) {
      found = { info: { url: o.endpoint, source: "endpoint" }, apiKey: undefined };
    } else if (this.mode !== "local") {
      found = await findRuntime();
    }
    if (found === null && this.mode === "server") {
      throw new InvalidRequestError(
        "mode \"server\" needs endpoint: \"http://host:port\" (or REALM_NB_ENDPOINT), and no " +
          "runtime of a Jupyter server was found", { param: "endpoint" });
    }
    if (found === null) {
      found = await acquireLocalRuntime(o.local ?? {}, o.defaultModel, o.weights);
      this.#ownsLocal = true;
    }
    const apiKey = o.apiKey || found.apiKey || envValue(API_KEY_ENVS);
    // A notebook names its tenant where the key speaks for many (a Jupyter server's runtime, a
    // local one, or a server without keys); a plain key acts as its own tenant only (as in Python).
    const ownKey = found.info.source === "runtime-file" || found.info.source === "local";
    const speaksForMany = !apiKey || (ownKey && apiKey === found.apiKey);
    const tenant = o.tenant ?? (speaksForMany ? notebookTenant() : undefined);
    const http = new HttpClient({ endpoint: found.info.url, apiKey, tenant, fetch: o.fetch });
    return { http, info: { ...found.info, url: http.endpoint } };
  }
}
