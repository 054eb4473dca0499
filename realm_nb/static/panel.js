// RealmPanel front end (anywidget ESM).
//
// State is synced traits: every control writes its trait on input, and the view listens to
// change:<trait> for every trait it shows. Actions are custom messages {id, action, ...}; the
// kernel answers each with {id, ok, error?}. A kernel busy running another cell of the notebook
// answers only when that cell ends: meanwhile the panel says it is waiting for the kernel (the
// request is queued, not lost), and never reports a failure for a late reply.

const BUSY_HINT_MS = 1000;

function h(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function labelled(text, input) {
  return h("label", { class: "realm-field" }, [h("span", { text }), input]);
}

function render({ model, el }) {
  let nextId = 1;
  const pending = new Map();

  function request(action, extra = {}) {
    const id = `${action}-${Date.now().toString(36)}-${nextId++}`;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        waiting.textContent = `waiting for the kernel: it is busy running another cell; ` +
          `"${action}" runs when it is free`;
        waiting.hidden = false;
      }, BUSY_HINT_MS);
      pending.set(id, (reply) => {
        clearTimeout(timer);
        if (![...pending.keys()].some((other) => other !== id)) waiting.hidden = true;
        resolve(reply);
      });
      model.send({ id, action, ...extra });
    });
  }

  function onCustom(msg) {
    if (msg && msg.id !== undefined && pending.has(msg.id)) {
      const done = pending.get(msg.id);
      pending.delete(msg.id);
      done(msg);
    }
  }

  async function act(action, extra) {
    const reply = await request(action, extra);
    if (!reply.ok) showError(reply.error || `${action} failed`);
    return reply;
  }

  // ---------------------------------------------------------------- layout
  const picker = h("select", { class: "realm-model", "data-testid": "realm-model" });
  const refresh = h("button", { class: "realm-refresh", title: "reread the registry",
                                text: "↻" });
  const path = h("input", { class: "realm-path", placeholder: "catalogue name or /path/model.gguf",
                            "data-testid": "realm-path" });
  const name = h("input", { class: "realm-name", placeholder: "name (optional)" });
  const load = h("button", { class: "realm-load", text: "Load" });
  const prompt = h("textarea", { class: "realm-prompt", rows: "3", placeholder: "Prompt",
                                 "data-testid": "realm-prompt" });
  const chat = h("input", { type: "checkbox", class: "realm-chat" });
  const temperature = h("input", { type: "number", min: "0", max: "2", step: "0.05",
                                   class: "realm-temperature" });
  const maxTokens = h("input", { type: "number", min: "1", max: "4096", step: "1",
                                 class: "realm-max-tokens", "data-testid": "realm-max-tokens" });
  const topP = h("input", { type: "number", min: "0.01", max: "1", step: "0.01",
                            class: "realm-top-p" });
  const seed = h("input", { type: "number", min: "0", step: "1", placeholder: "random",
                            class: "realm-seed" });
  const generate = h("button", { class: "realm-generate", text: "Generate",
                                 "data-testid": "realm-generate" });
  const stop = h("button", { class: "realm-stop", text: "Stop", "data-testid": "realm-stop" });
  const output = h("pre", { class: "realm-text", "data-testid": "realm-text" });
  const status = h("span", { class: "realm-status", "data-testid": "realm-status" });
  const tokens = h("span", { class: "realm-tokens", "data-testid": "realm-tokens" });
  const speed = h("span", { class: "realm-tok-s", "data-testid": "realm-tok-s" });
  const error = h("div", { class: "realm-error", "data-testid": "realm-error" });
  const waiting = h("div", { class: "realm-waiting", "data-testid": "realm-waiting" });
  waiting.hidden = true;

  const root = h("div", { class: "realm-panel" }, [
    h("div", { class: "realm-row" }, [labelled("Model", picker), refresh]),
    h("div", { class: "realm-row" }, [path, name, load]),
    prompt,
    h("div", { class: "realm-row realm-params" }, [
      labelled("Temperature", temperature), labelled("Max tokens", maxTokens),
      labelled("Top-p", topP), labelled("Seed", seed), labelled("Chat", chat),
    ]),
    h("div", { class: "realm-row" }, [generate, stop, status, tokens, speed]),
    waiting,
    output,
    error,
  ]);
  el.append(root);

  // ---------------------------------------------------------------- trait → view
  function showError(message) {
    error.textContent = message || "";
    error.hidden = !message;
  }
  const views = {
    models() {
      const current = model.get("model");
      picker.replaceChildren(...model.get("models").map((m) =>
        h("option", { value: m.name, text: m.label || m.name })));
      if (current && !model.get("models").some((m) => m.name === current)) {
        picker.append(h("option", { value: current, text: current }));
      }
      picker.value = current;
    },
    model() { picker.value = model.get("model"); },
    prompt() { if (prompt.value !== model.get("prompt")) prompt.value = model.get("prompt"); },
    chat() { chat.checked = model.get("chat"); },
    temperature() { temperature.value = model.get("temperature"); },
    max_tokens() { maxTokens.value = model.get("max_tokens"); },
    top_p() { topP.value = model.get("top_p"); },
    seed() { const s = model.get("seed"); seed.value = s === null ? "" : s; },
    text() {
      const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
      output.textContent = model.get("text");
      if (atEnd) output.scrollTop = output.scrollHeight;
    },
    status() { status.textContent = model.get("status"); status.dataset.status = model.get("status"); },
    tokens() { tokens.textContent = `${model.get("tokens")} tokens`; },
    tok_s() { speed.textContent = `${model.get("tok_s").toFixed(1)} tok/s`; },
    error() { showError(model.get("error")); },
    running() {
      const running = model.get("running");
      generate.disabled = running;
      stop.disabled = !running;
      root.classList.toggle("realm-running", running);
    },
  };
  const listeners = Object.entries(views).map(([trait, fn]) => {
    const cb = () => fn();
    model.on(`change:${trait}`, cb);
    fn();
    return [`change:${trait}`, cb];
  });
  model.on("msg:custom", onCustom);

  // ---------------------------------------------------------------- view → traits / actions
  function set(trait, value) {
    model.set(trait, value);
    model.save_changes();
  }
  function number(input, fallback) {
    const v = Number(input.value);
    return input.value === "" || Number.isNaN(v) ? fallback : v;
  }
  picker.addEventListener("change", () => set("model", picker.value));
  prompt.addEventListener("input", () => set("prompt", prompt.value));
  chat.addEventListener("change", () => set("chat", chat.checked));
  temperature.addEventListener("change", () => set("temperature", number(temperature, 0.8)));
  maxTokens.addEventListener("change", () => set("max_tokens", Math.trunc(number(maxTokens, 64))));
  topP.addEventListener("change", () => set("top_p", number(topP, 0.95)));
  seed.addEventListener("change", () =>
    set("seed", seed.value === "" ? null : Math.trunc(number(seed, 0))));
  refresh.addEventListener("click", () => act("refresh"));
  load.addEventListener("click", () => act("load", { path: path.value, name: name.value }));
  generate.addEventListener("click", () => {
    showError("");
    act("generate", { prompt: prompt.value, model: picker.value });
  });
  stop.addEventListener("click", () => act("stop"));

  return () => {
    for (const [event, cb] of listeners) model.off(event, cb);
    model.off("msg:custom", onCustom);
    for (const done of pending.values()) done({ ok: false, error: "view closed" });
    pending.clear();
  };
}

export default { render };
