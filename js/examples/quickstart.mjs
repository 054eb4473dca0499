// realm-nb from Node: one greedy completion, a streamed one (Ctrl-C aborts it), a chat reply.
//
//   REALM_NB_ENDPOINT=http://127.0.0.1:8080 REALM_NB_API_KEY=sk-alice node examples/quickstart.mjs
//
// Without REALM_NB_ENDPOINT (and no Jupyter server's runtime on this machine) it starts a local
// runtime, `realm-nb serve` on loopback, and stops it when done.
import { Realm, RealmError } from "realm-nb";

const maxTokens = Number(process.env.QUICKSTART_MAX_TOKENS ?? 32);
const realm = new Realm(); // mode "auto"; or new Realm({ endpoint, apiKey, defaultModel })

try {
  const runtime = await realm.runtime();
  console.log(`runtime: ${runtime.url} (${runtime.source})`);

  const g = await realm.generate({ prompt: "The capital of France is", maxTokens, temperature: 0 });
  console.log(JSON.stringify(g.text), `- ${g.finishReason}, ${g.usage.completionTokens} tokens,`,
              `${g.timings.tokensPerS.toFixed(1)} tok/s`);

  const controller = new AbortController();
  const onInterrupt = () => controller.abort();
  process.once("SIGINT", onInterrupt);
  const stream = realm.generate({ prompt: "Once upon a time", maxTokens, stream: true,
                                  signal: controller.signal,
                                  onProgress: (p) => console.error(`[${p.stage}]`) });
  try {
    for await (const piece of stream) process.stdout.write(piece);
    console.log(`\n(${(await stream.result()).finishReason})`);
  } catch (e) {
    if (!controller.signal.aborted) throw e;
    console.log("\n(aborted)");
  } finally {
    process.off("SIGINT", onInterrupt);
  }

  const reply = await realm.chat([{ role: "user", content: "What is the capital of France?" }],
                                 { maxTokens, temperature: 0 });
  console.log("chat:", reply.text);
} catch (e) {
  if (!(e instanceof RealmError)) throw e;
  console.error(`${e.name}: ${e.message}`); // one line: what was wrong and what to do
  process.exitCode = 1;
} finally {
  await realm.close();
}
