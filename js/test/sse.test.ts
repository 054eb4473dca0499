import assert from "node:assert/strict";
import { describe, it } from "node:test";

// Internal module: not part of the public API, so the test reads the built file.
import { SseParser } from "../dist/sse.js";

describe("SseParser", () => {
  it("yields an event only once its blank line has arrived, however the text is cut", () => {
    const text =
      'data: {"text":" Par"}\r\n\r\ndata: {"text":"is"}\n\n: keep-alive\n\ndata: [DONE]\r\r';
    const parser = new SseParser();
    const whole = [...parser.push(text), ...parser.end()].map((e) => e.data);
    assert.deepEqual(whole, ['{"text":" Par"}', '{"text":"is"}', "[DONE]"]);
    for (let cut = 1; cut < text.length; cut++) { // every place a network chunk could end
      const p = new SseParser();
      const got = [...p.push(text.slice(0, cut)), ...p.push(text.slice(cut)), ...p.end()]
        .map((e) => e.data);
      assert.deepEqual(got, whole, `cut at ${cut}`);
    }
  });

  it("joins the data lines of one event with a newline and keeps event and id fields", () => {
    const [event, ...rest] = new SseParser().push("event: note\nid: 7\ndata: a\ndata:b\n\n");
    assert.deepEqual(event, { event: "note", data: "a\nb", id: "7" });
    assert.equal(rest.length, 0);
  });

  it("holds a CR that ends a chunk until it knows whether an LF follows", () => {
    const p = new SseParser();
    assert.deepEqual(p.push("data: x\r"), []);
    assert.deepEqual(p.push("\n").length, 0); // CRLF: one line end, not two
    assert.deepEqual(p.push("\r\n").map((e) => e.data), ["x"]);
  });
});
