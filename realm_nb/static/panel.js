// RealmPanel front end (anywidget ESM).
//
// State is synced traits: every control writes its trait on input, and the view listens to
// change:<trait> for every trait it shows. Actions are custom messages {id, action, ...}; the
// kernel answers each with {id, ok, error?}. A kernel busy running another cell of the notebook
// answers only when that cell ends: meanwhile the panel says it is waiting for the kernel (the
// request is queued, not lost), and never reports a failure for a late reply.
//
// Keys in the prompt: Enter inserts a newline, Ctrl/Cmd+Enter generates, and no Enter reaches
// JupyterLab (whose Shift+Enter would run the cell and Ctrl+Enter re-run it).

const BUSY_HINT_MS = 1000;
const REFRESH_EVERY_MS = 3000; // the picker rereads the registry at most this often on hover

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

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// A token's probability as a background: red (unlikely) through yellow to green (likely),
// translucent so that the theme's text colour stays readable on light and dark backgrounds.
function probColour(p) {
  const hue = Math.round(120 * Math.max(0, Math.min(1, p)));
  return `hsla(${hue}, 85%, 50%, 0.35)`;
}

// Stop strings as typed: JSON strings separated by commas ("\n\n", "User:").
function parseStops(text) {
  if (!text.trim()) return [];
  const value = JSON.parse(`[${text}]`);
  if (!value.every((s) => typeof s === "string" && s.length > 0)) throw new Error("not strings");
  return value;
}

function render({ model, el }) {
  let nextId = 1;
  const pending = new Map();

  function request(action, extra = {}, { quiet = false } = {}) {
    const id = `${action}-${Date.now().toString(36)}-${nextId++}`;
    return new Promise((resolve) => {
      const timer = quiet ? null : setTimeout(() => {
        waiting.textContent = `waiting for the kernel: it is busy running another cell; ` +
          `"${action}" runs when it is free`;
        waiting.hidden = false;
      }, BUSY_HINT_MS);
      pending.set(id, (reply) => {
        if (timer !== null) clearTimeout(timer);
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

  async function act(action, extra, options) {
    const reply = await request(action, extra, options);
    if (!reply.ok) showError(reply.error || `${action} failed`);
    return reply;
  }

  // ---------------------------------------------------------------- layout
  const picker = h("select", { class: "realm-model", "data-testid": "realm-model" });
  const loaded = h("span", { class: "realm-loaded", "data-testid": "realm-loaded" });
  const refresh = h("button", { class: "realm-refresh", title: "reread the registry",
                                text: "↻" });
  const path = h("input", { class: "realm-path", placeholder: "catalogue name or /path/model.gguf",
                            "data-testid": "realm-path" });
  const name = h("input", { class: "realm-name", placeholder: "name (optional)" });
  const load = h("button", { class: "realm-load", text: "Load" });
  const prompt = h("textarea", { class: "realm-prompt", rows: "3",
                                 placeholder: "Prompt (Ctrl+Enter generates)",
                                 "data-testid": "realm-prompt" });
  const chat = h("input", { type: "checkbox", class: "realm-chat" });
  const number = (cls, min, max, step, testid) => h("input", {
    type: "number", min, max, step, class: cls, "data-testid": testid });
  const temperature = number("realm-temperature", "0", "2", "0.05", "realm-temperature");
  const maxTokens = number("realm-max-tokens", "1", "4096", "1", "realm-max-tokens");
  const topK = number("realm-top-k", "0", "512", "1", "realm-top-k");
  const topP = number("realm-top-p", "0.01", "1", "0.01", "realm-top-p");
  const minP = number("realm-min-p", "0", "0.99", "0.01", "realm-min-p");
  const repeatPenalty = number("realm-repeat-penalty", "0.5", "2", "0.05", "realm-repeat-penalty");
  const seed = h("input", { type: "text", inputmode: "numeric", placeholder: "random",
                            class: "realm-seed", "data-testid": "realm-seed" });
  const stops = h("input", { type: "text", class: "realm-stop-strings",
                             placeholder: '"\\n\\n", "User:"', "data-testid": "realm-stop-strings" });
  const showProbs = h("input", { type: "checkbox", class: "realm-show-probs",
                                 "data-testid": "realm-show-probs" });
  const generate = h("button", { class: "realm-generate", text: "Generate",
                                 title: "Ctrl+Enter in the prompt", "data-testid": "realm-generate" });
  const stop = h("button", { class: "realm-stop", text: "Stop", "data-testid": "realm-stop" });
  const output = h("div", { class: "realm-text", "data-testid": "realm-text" });
  const tip = h("div", { class: "realm-tip", "data-testid": "realm-tip" });
  tip.hidden = true;
  const legend = h("span", { class: "realm-legend", title: "probability of each token" },
    [0.05, 0.5, 0.95].map((p) => {
      const swatch = h("span", { class: "realm-swatch", text: percent(p) });
      swatch.style.backgroundColor = probColour(p);
      return swatch;
    }));
  const status = h("span", { class: "realm-status", "data-testid": "realm-status" });
  const tokens = h("span", { class: "realm-tokens", "data-testid": "realm-tokens" });
  const speed = h("span", { class: "realm-tok-s", "data-testid": "realm-tok-s" });
  const lastSeed = h("span", { class: "realm-last-seed", "data-testid": "realm-last-seed" });
  const error = h("div", { class: "realm-error", "data-testid": "realm-error" });
  const waiting = h("div", { class: "realm-waiting", "data-testid": "realm-waiting" });
  waiting.hidden = true;

  const root = h("div", { class: "realm-panel" }, [
    h("div", { class: "realm-row realm-model-row" }, [labelled("Model", picker), loaded, refresh]),
    h("div", { class: "realm-row realm-load-row" }, [path, name, load]),
    prompt,
    h("div", { class: "realm-params" }, [
      labelled("Temperature", temperature), labelled("Max tokens", maxTokens),
      labelled("Top-k", topK), labelled("Top-p", topP), labelled("Min-p", minP),
      labelled("Repeat penalty", repeatPenalty), labelled("Seed", seed),
      labelled("Stop strings", stops),
    ]),
    h("div", { class: "realm-row realm-toggles" }, [
      labelled("Chat template", chat), labelled("Probabilities", showProbs), legend,
    ]),
    h("div", { class: "realm-row" }, [generate, stop, status, tokens, speed, lastSeed]),
    waiting,
    output,
    tip,
    error,
  ]);
  el.append(root);

  // ---------------------------------------------------------------- trait → view
  function showError(message) {
    error.textContent = message || "";
    error.hidden = !message;
  }
  function showLoaded() {
    const row = model.get("models").find((m) => m.name === model.get("model"));
    const state = row === undefined ? "" : row.loaded ? "loaded" : "not loaded";
    loaded.textContent = state;
    loaded.dataset.loaded = state;
  }
  function showText() {
    const probs = model.get("probs");
    const asProbs = model.get("show_probs") && !model.get("running") && probs.length > 0;
    root.classList.toggle("realm-probs", asProbs);
    legend.hidden = !asProbs;
    tip.hidden = true;
    if (asProbs) {
      output.replaceChildren(...probs.map((tok, i) => {
        const span = h("span", { class: "realm-token", "data-i": String(i), text: tok.t });
        span.style.backgroundColor = probColour(tok.p);
        return span;
      }));
      return;
    }
    const atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
    output.textContent = model.get("text").replace(/^\s+/, "");
    if (atEnd) output.scrollTop = output.scrollHeight;
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
      showLoaded();
    },
    model() { picker.value = model.get("model"); showLoaded(); },
    prompt() { if (prompt.value !== model.get("prompt")) prompt.value = model.get("prompt"); },
    chat() { chat.checked = model.get("chat"); },
    temperature() { temperature.value = model.get("temperature"); },
    max_tokens() { maxTokens.value = model.get("max_tokens"); },
    top_k() { topK.value = model.get("top_k"); },
    top_p() { topP.value = model.get("top_p"); },
    min_p() { minP.value = model.get("min_p"); },
    repeat_penalty() { repeatPenalty.value = model.get("repeat_penalty"); },
    seed_text() { if (seed.value !== model.get("seed_text")) seed.value = model.get("seed_text"); },
    stop_strings() {
      const shown = model.get("stop_strings").map((s) => JSON.stringify(s)).join(", ");
      if (document.activeElement !== stops) stops.value = shown;
    },
    show_probs() { showProbs.checked = model.get("show_probs"); showText(); },
    probs() { showText(); },
    text() { showText(); },
    status() { status.textContent = model.get("status"); status.dataset.status = model.get("status"); },
    tokens() { tokens.textContent = `${model.get("tokens")} tokens`; },
    tok_s() { speed.textContent = `${model.get("tok_s").toFixed(1)} tok/s`; },
    last_seed() {
      const s = model.get("last_seed");
      lastSeed.textContent = s ? `seed ${s}` : "";
    },
    error() { showError(model.get("error")); },
    running() {
      const running = model.get("running");
      generate.disabled = running;
      stop.disabled = !running;
      root.classList.toggle("realm-running", running);
      showText();
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
  function numberOf(input, trait) {
    const v = Number(input.value);
    return input.value === "" || Number.isNaN(v) ? model.get(trait) : v;
  }
  function startGenerate() {
    if (model.get("running")) return;
    showError("");
    act("generate", { prompt: prompt.value, model: picker.value });
  }
  picker.addEventListener("change", () => set("model", picker.value));
  let lastRefresh = 0;
  picker.addEventListener("pointerenter", () => { // live loaded / not loaded before it opens
    const now = Date.now();
    if (now - lastRefresh < REFRESH_EVERY_MS || model.get("running")) return;
    lastRefresh = now;
    request("refresh", {}, { quiet: true });
  });
  prompt.addEventListener("input", () => set("prompt", prompt.value));
  prompt.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.stopPropagation(); // JupyterLab would run (Shift) or re-run (Ctrl) the cell
    if (event.ctrlKey || event.metaKey) {
      event.preventDefault();
      set("prompt", prompt.value);
      startGenerate();
    } else if (event.shiftKey) { // a newline, as Enter (the notebook keeps Shift+Enter's own)
      event.preventDefault();
      prompt.setRangeText("\n", prompt.selectionStart, prompt.selectionEnd, "end");
      set("prompt", prompt.value);
    }
  });
  chat.addEventListener("change", () => set("chat", chat.checked));
  showProbs.addEventListener("change", () => set("show_probs", showProbs.checked));
  const numbers = [[temperature, "temperature"], [maxTokens, "max_tokens"], [topK, "top_k"],
                   [topP, "top_p"], [minP, "min_p"], [repeatPenalty, "repeat_penalty"]];
  for (const [input, trait] of numbers) {
    const integer = trait === "max_tokens" || trait === "top_k";
    input.addEventListener("change", () => {
      const v = numberOf(input, trait);
      set(trait, integer ? Math.trunc(v) : v);
    });
  }
  seed.addEventListener("change", () => set("seed_text", seed.value.trim()));
  stops.addEventListener("change", () => {
    try {
      set("stop_strings", parseStops(stops.value));
      showError("");
    } catch {
      showError('Stop strings: write them in double quotes, separated by commas, e.g. ' +
                '"\\n\\n", "User:"');
    }
  });
  refresh.addEventListener("click", () => act("refresh"));
  load.addEventListener("click", () => act("load", { path: path.value, name: name.value }));
  generate.addEventListener("click", startGenerate);
  stop.addEventListener("click", () => act("stop"));

  // the probability view: hover a token for its probability and the likeliest alternatives
  output.addEventListener("mouseover", (event) => {
    const span = event.target.closest && event.target.closest(".realm-token");
    if (!span) return;
    const tok = model.get("probs")[Number(span.dataset.i)];
    if (!tok) return;
    tip.replaceChildren(
      h("div", { class: "realm-tip-head", text: `${JSON.stringify(tok.t)}  ${percent(tok.p)}` }),
      ...tok.top.map((alt) => h("div", {
        class: alt.t === tok.t ? "realm-tip-alt realm-tip-chosen" : "realm-tip-alt",
        text: `${JSON.stringify(alt.t)}  ${percent(alt.p)}`,
      })));
    const box = root.getBoundingClientRect();
    const at = span.getBoundingClientRect();
    tip.hidden = false;
    const left = Math.min(at.left - box.left, box.width - tip.offsetWidth - 4);
    tip.style.left = `${Math.max(4, left)}px`;
    // below the token where the panel has room for it, else above (never cut by the panel)
    const below = at.bottom - box.top + 4;
    const fits = below + tip.offsetHeight <= box.height;
    tip.style.top = `${fits ? below : Math.max(0, at.top - box.top - tip.offsetHeight - 4)}px`;
  });
  output.addEventListener("mouseleave", () => { tip.hidden = true; });

  return () => {
    for (const [event, cb] of listeners) model.off(event, cb);
    model.off("msg:custom", onCustom);
    for (const done of pending.values()) done({ ok: false, error: "view closed" });
    pending.clear();
  };
}

export default { render };
