/**
 * `GenerationStream`: one generation running on the runtime, as an async iterable of text pieces.
 *
 * It speaks realm-nb's own call, `POST /v1/realm/generate` with `stream: true`, whose SSE events
 * are, in order: `{"request_id", "model"}`, cold-start `{"progress": {...}}`, `{"text": piece}`
 * per piece, then `{"generation": {...}}` (the whole result: token ids, usage, timings, logprobs)
 * or `{"error": {...}}`, then `[DONE]`. Every call of the SDK goes through it, streamed or not, so
 * that both kinds report progress, can be cancelled, and return the same `Generation`.
 *
 * The body is read as soon as the stream exists, whether or not anyone iterates, into `pieces`;
 * each iterator walks `pieces` from the start. Three ways to stop, as in the Python SDK:
 * - `cancel()`: the runtime stops the guest; the stream still ends with the partial generation
 *   (`finishReason: "cancelled"`), which `result()` returns;
 * - leaving a `for await` loop early (`break`, `throw`): cancels the same way;
 * - the caller's `AbortSignal`: the connection is dropped and the runtime told to cancel (either
 *   alone frees the slot: the server cancels a generation whose client went away); iteration and
 *   `result()` reject with the signal's reason, as `fetch` does.
 */

import { errorFromPayload, RequestNotFoundError, ServerConnectionError } from "./errors.js";
import type { HttpClient } from "./http.js";
import { parseJson } from "./json.js";
import { readSse } from "./sse.js";
import { generationFromWire, progressFromWire } from "./types.js";
import type { Generation, Progress } from "./types.js";

export interface StreamOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: Progress) => void) | undefined;
}

type Wire = Record<string, unknown>;

export class GenerationStream implements AsyncIterable<string> {
  /** The runtime's id of this request (`"req-7"`), once its first event has arrived. */
  requestId: string | null = null;
  /** The model that serves it (the resolved name, once known). */
  model: string;
  /** The text pieces received so far. */
  readonly pieces: string[] = [];
  /** The whole result, once the stream has ended well. */
  generation: Generation | null = null;

  readonly #connect: Promise<HttpClient>;
  readonly #controller = new AbortController();
  readonly #signal: AbortSignal | undefined;
  readonly #onProgress: ((progress: Progress) => void) | undefined;
  readonly #ended: Promise<void>;
  #error: unknown = undefined;
  #callbackError: { error: unknown } | null = null;
  #failed = false;
  #done = false;
  #wake: () => void = () => undefined;
  #changed: Promise<void>;
  #named!: (id: string | null) => void;
  readonly #requestIdKnown: Promise<string | null>;

  constructor(connect: Promise<HttpClient>, body: Wire, options: StreamOptions = {}) {
    this.#connect = connect;
    connect.catch(() => undefined); // its failure reaches the caller through result()/iteration
    this.model = typeof body["model"] === "string" ? body["model"] : "";
    this.#signal = options.signal;
    this.#onProgress = options.onProgress;
    this.#changed = this.#nextChange();
    this.#requestIdKnown = new Promise((resolve) => { this.#named = resolve; });
    this.#ended = this.#run({ ...body, stream: true });
  }

  /** True once the stream has ended (well or not). */
  get done(): boolean {
    return this.#done;
  }

  /** The text so far (all of it, once done). */
  get text(): string {
    return this.generation?.text ?? this.pieces.join("");
  }

  async *[Symbol.asyncIterator](): AsyncIterator<string> {
    let i = 0;
    let finished = false;
    try {
      for (;;) {
        if (i < this.pieces.length) {
          yield this.pieces[i++] as string;
          continue;
        }
        if (this.#done) break;
        await this.#changed;
      }
      finished = true;
    } finally {
      if (!finished && !this.#done) this.cancel().catch(() => undefined); // left the loop early
    }
    if (this.#failed) throw this.#error;
  }

  /**
   * Ask the runtime to stop this generation; resolves once it has agreed. The stream then ends
   * with the partial generation (`finishReason: "cancelled"`). A no-op once it has ended.
   */
  async cancel(): Promise<void> {
    const id = await Promise.race([this.#requestIdKnown, this.#ended.then(() => null)]);
    if (id === null || this.#done) return;
    const http = await this.#connect;
    try {
      await http.json("POST", `/v1/requests/${encodeURIComponent(id)}/cancel`);
    } catch (e) {
      if (!(e instanceof RequestNotFoundError)) throw e; // else it finished meanwhile
    }
  }

  /** The whole generation, once the stream has ended; rejects with what ended it otherwise. */
  async result(): Promise<Generation> {
    await this.#ended;
    if (this.#failed) throw this.#error;
    return this.generation as Generation;
  }

  // ------------------------------------------------------------------ reading the body

  #nextChange(): Promise<void> {
    return new Promise((resolve) => { this.#wake = resolve; });
  }

  #notify(): void {
    const wake = this.#wake;
    this.#changed = this.#nextChange();
    wake();
  }

  async #run(body: Wire): Promise<void> {
    const signal = this.#signal;
    const onAbort = (): void => this.#abort();
    let http: HttpClient | undefined;
    try {
      if (signal?.aborted) throw signal.reason;
      signal?.addEventListener("abort", onAbort, { once: true });
      http = await this.#connect;
      if (signal?.aborted) throw signal.reason;
      const response = await http.send("POST", "/v1/realm/generate", body,
                                        this.#controller.signal, "sse");
      if (response.body === null) throw new ServerConnectionError("the server sent no body");
      for await (const event of readSse(response.body)) {
        if (event.data === "[DONE]") break;
        this.#handle(parseJson(event.data) as Wire);
      }
      if (this.generation === null && !this.#failed) {
        throw new ServerConnectionError(
          `the server at ${http.endpoint} ended request ${this.requestId} without its result`,
          { param: "endpoint" });
      }
    } catch (e) {
      this.#failed = true;
      this.#error = signal?.aborted ? signal.reason
        : this.#callbackError !== null ? this.#callbackError.error
        : http === undefined ? e : http.failure(e, undefined, this.requestId);
      if (!this.#controller.signal.aborted) this.#controller.abort(this.#error); // drop the body
    } finally {
      signal?.removeEventListener("abort", onAbort);
      this.#done = true;
      this.#named(null);
      this.#notify();
    }
  }

  #handle(event: Wire): void {
    if (typeof event["text"] === "string") {
      this.pieces.push(event["text"]);
      this.#notify();
    } else if ("progress" in event) {
      try {
        this.#onProgress?.(progressFromWire(event["progress"] as Wire));
      } catch (e) { // the caller's own error ends the stream as it is
        this.#callbackError = { error: e };
        throw e;
      }
    } else if ("generation" in event) {
      this.generation = generationFromWire(event["generation"] as Wire);
    } else if ("error" in event) {
      this.#failed = true;
      this.#error = errorFromPayload(event);
    } else if (typeof event["request_id"] === "string") {
      this.requestId = event["request_id"];
      if (typeof event["model"] === "string") this.model = event["model"];
      this.#named(this.requestId);
    }
  }

  /** The caller's signal fired: tell the runtime (best effort), then drop the connection. */
  #abort(): void {
    const id = this.requestId;
    if (id !== null && !this.#done) {
      this.#connect
        .then((http) => http.json("POST", `/v1/requests/${encodeURIComponent(id)}/cancel`))
        .catch(() => undefined); // the dropped connection cancels it too
    }
    this.#controller.abort(this.#signal?.reason);
  }
}
