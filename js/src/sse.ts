/**
 * Server-sent events from a `fetch` body: bytes → lines → events.
 *
 * `EventSource` cannot send a POST body or an `Authorization` header, so the stream is read from
 * `fetch`'s `ReadableStream` and parsed here, following the WHATWG rules (lines end in LF, CRLF or
 * CR; `data:` lines of one event are joined with LF; a blank line ends an event; lines starting
 * with `:` are comments; an event cut off by the end of the stream is dropped). The parser is a
 * plain class, fed strings, so that tests can cut the input anywhere.
 */

export interface SseEvent {
  /** The `event:` field, "message" when absent. */
  event: string;
  /** The `data:` lines joined with "\n". */
  data: string;
  /** The `id:` field, when the event had one. */
  id?: string;
}

/** An incremental SSE parser: `push(text)` returns the events completed by that text. */
export class SseParser {
  #buffer = "";
  #data: string[] = [];
  #event = "";
  #id: string | undefined;
  #hasData = false;

  push(text: string): SseEvent[] {
    this.#buffer += text;
    const out: SseEvent[] = [];
    let start = 0;
    for (;;) {
      const lf = this.#buffer.indexOf("\n", start);
      const cr = this.#buffer.indexOf("\r", start);
      const end = lf === -1 ? cr : cr === -1 ? lf : Math.min(lf, cr);
      if (end === -1) break;
      let next = end + 1;
      if (this.#buffer[end] === "\r") {
        if (end + 1 === this.#buffer.length) break; // CR at the end: wait to see if LF follows
        if (this.#buffer[end + 1] === "\n") next = end + 2;
      }
      const event = this.#line(this.#buffer.slice(start, end));
      if (event !== null) out.push(event);
      start = next;
    }
    this.#buffer = this.#buffer.slice(start);
    return out;
  }

  /** The stream has ended: a CR held back at the very end was a line end after all. */
  end(): SseEvent[] {
    if (!this.#buffer.endsWith("\r")) return [];
    return this.push("\n"); // completes the held CR as one line end, never as two
  }

  #line(line: string): SseEvent | null {
    if (line === "") return this.#dispatch();
    if (line.startsWith(":")) return null; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") {
      this.#data.push(value);
      this.#hasData = true;
    } else if (field === "event") {
      this.#event = value;
    } else if (field === "id" && !value.includes("\u0000")) {
      this.#id = value;
    } // "retry" and unknown fields: nothing to do for a one-shot POST stream
    return null;
  }

  #dispatch(): SseEvent | null {
    const event: SseEvent | null = this.#hasData
      ? { event: this.#event || "message", data: this.#data.join("\n") }
      : null;
    if (event !== null && this.#id !== undefined) event.id = this.#id;
    this.#data = [];
    this.#event = "";
    this.#hasData = false;
    return event;
  }
}

/**
 * The events of an SSE body, as they arrive. Aborting the fetch ends this with the abort's
 * reason; leaving the loop early cancels the body (which closes the connection).
 */
export async function* readSse(body: ReadableStream<Uint8Array>): AsyncGenerator<SseEvent> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SseParser();
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    finished = true;
    yield* parser.push(decoder.decode());
    yield* parser.end(); // an event not ended by a blank line is dropped, as the standard says
  } finally {
    if (!finished) await reader.cancel().catch(() => undefined);
    reader.releaseLock();
  }
}
