"""The panel in real JupyterLab, driven by Debian's Chromium through Playwright.

Recipe (shared/FACTS.md, "Jupyter in a real browser"): JupyterLab started with Popen on a free port
with a token, temporary workspaces and config dirs, the app exposed as `window.jupyterapp`, the
announcements toast disabled, serving a temporary copy of the notebooks; wait until the notebook's
kernel is connected and idle, then run all cells through `jupyterapp.commands`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # JupyterLab generating with SmolLM2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a temporary copy of notebooks/; yields (base_url, token, folder).

    realm-nb's server extension is enabled (pip installs it), so its kernels share one runtime.
    """
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y "
                    "chromium) to run the browser tests")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    root = tmp_path_factory.mktemp("lab")
    served = root / "notebooks"
    shutil.copytree(REPO / "notebooks", served,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    config = root / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config),
           "JUPYTER_RUNTIME_DIR": str(root / "runtime")}
    log = open(root / "jupyter.log", "w")  # noqa: SIM115 (closed in the teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
         f"--LabApp.workspaces_dir={root / 'workspaces'}", "--LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=served)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start; log:\n"
                                       + (root / "jupyter.log").read_text()[-3000:]) from None
                time.sleep(0.3)
        yield base, token, served
    finally:
        proc.terminate()  # this server only, by its PID; it shuts its kernels down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


KERNEL_READY = """() => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""

ALL_RAN = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const k = w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter((c) => c.model.type === 'code');
  return k.status === 'idle' && cells.every((c) => c.model.executionCount !== null);
}"""

PYTHON = """async (expr) => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const reply = await k.requestExecute({code: '', silent: true, store_history: false,
                                        user_expressions: {v: expr}}).done;
  const v = reply.content.user_expressions.v;
  return v.status === 'ok' ? v.data['text/plain'] : 'ERROR ' + v.ename + ': ' + v.evalue;
}"""


CELLS_STATE = """() => {
  const nb = window.jupyterapp.shell.currentWidget.content;
  return {active: nb.activeCellIndex,
          counts: nb.widgets.map((c) => c.model.type === 'code' ? c.model.executionCount : null)};
}"""

SET_THEME = """async (theme) => {
  await window.jupyterapp.commands.execute('apputils:change-theme', {theme});
}"""

# Where the text of `el` wraps: visual line starts that no newline asks for ("soft"), and those
# among them that split a word (a letter or digit on both sides of the wrap).
WRAPS = r"""(el) => {
  const chars = [];
  const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (let i = 0; i < node.length; i++) {
      const r = document.createRange();
      r.setStart(node, i);
      r.setEnd(node, i + 1);
      const rect = r.getClientRects()[0];
      chars.push({ch: node.data[i], top: rect ? rect.top : null, left: rect ? rect.left : null});
    }
  }
  const word = (ch) => /[\p{L}\p{N}]/u.test(ch);
  let soft = 0, hard = 0, lastTop = null;
  const broken = [];
  for (let i = 0; i < chars.length; i++) {
    const c = chars[i];
    if (c.top === null || c.ch.trim() === '') continue;
    if (lastTop !== null && c.top > lastTop + 2) {  // c starts a visual line
      let j = i - 1;
      while (j >= 0 && chars[j].ch !== '\n' && chars[j].ch.trim() === '') j--;
      if (j >= 0 && chars[j].ch === '\n') hard++;
      else {
        soft++;
        if (word(chars[i - 1].ch) && word(c.ch)) broken.push(chars[i - 1].ch + '|' + c.ch);
      }
    }
    lastTop = c.top;
  }
  const box = el.getBoundingClientRect();
  const first = chars.find((c) => c.top !== null && c.ch.trim() !== '');
  const style = getComputedStyle(el);
  return {soft, hard, broken, text: el.textContent, wordBreak: style.wordBreak,
          whiteSpace: style.whiteSpace, tag: el.tagName,
          indent: first.left - box.left - parseFloat(style.paddingLeft),
          firstLineOffset: first.top - box.top - parseFloat(style.paddingTop),
          lineHeight: parseFloat(style.lineHeight)};
}"""

# Colours of an element as the page paints them: its text and its nearest opaque background.
COLOURS = """(el) => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  let bg = el, c = rgb(getComputedStyle(el).backgroundColor);
  while (bg && (c.length < 3 || c[3] === 0)) {
    bg = bg.parentElement;
    c = bg ? rgb(getComputedStyle(bg).backgroundColor) : [255, 255, 255];
  }
  return {fg: rgb(getComputedStyle(el).color).slice(0, 3), bg: c.slice(0, 3)};
}"""


def luminance(rgb: list[float]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    def channel(v: float) -> float:
        v /= 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(v) for v in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: list[float], b: list[float]) -> float:
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def wait_python(python, expr: str, want: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    got = python(expr)
    while got != want and time.monotonic() < deadline:
        time.sleep(0.2)
        got = python(expr)
    return got


def test_panel_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    base, token, _ = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/lab/tree/02_panel.ipynb?token={token}")
            page.wait_for_function(KERNEL_READY, timeout=120_000, polling=200)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_function(ALL_RAN, timeout=420_000, polling=500)

            def python(expr: str) -> str:
                return str(page.evaluate(PYTHON, expr))

            panel = page.locator(".realm-panel").first
            panel.wait_for(timeout=30_000)
            assert python("panel.status") == "'done'", python("panel.error")
            text = panel.locator("[data-testid=realm-text]")
            prompt = panel.locator("[data-testid=realm-prompt]")

            # 1. choose a model in the picker: Python sees it; the picker says it is loaded
            picker = panel.locator("[data-testid=realm-model]")
            options = picker.locator("option").evaluate_all(
                "os => os.map(o => [o.value, o.textContent])")
            assert any(v == "smollm2-135m" and t.startswith("smollm2-135m (")
                       and t.endswith(" resident, loaded)") for v, t in options), options
            assert any(v == "smollm2" and "loaded" in t for v, t in options), options
            picker.select_option("smollm2")
            assert wait_python(python, "panel.model", "'smollm2'") == "'smollm2'"
            assert panel.locator("[data-testid=realm-loaded]").text_content() == "loaded"

            max_tokens = panel.locator("[data-testid=realm-max-tokens]")

            def set_max_tokens(n: int) -> None:
                """Type a value into the panel and wait until Python's trait holds it."""
                max_tokens.fill(str(n))
                max_tokens.press("Tab")
                wait_python(python, "panel.max_tokens", str(n))

            set_max_tokens(60)
            panel.locator("input.realm-chat").uncheck()

            # 2. keys in the prompt: Enter is a newline, Shift+Enter does not run the cell
            prompt.click()
            before = page.evaluate(CELLS_STATE)
            prompt.fill("Once upon a time,")
            prompt.press("Enter")
            prompt.press("Shift+Enter")
            prompt.press_sequentially("a cat named Tom")
            time.sleep(1.5)  # a cell run (or a generation) would have begun by now
            assert prompt.input_value() == "Once upon a time,\n\na cat named Tom"
            assert page.evaluate(CELLS_STATE) == before, "a key in the prompt ran a cell"
            assert python("panel.status") == "'done'" and python("panel.running") == "False"
            assert wait_python(python, "panel.prompt", repr(prompt.input_value())) == \
                repr("Once upon a time,\n\na cat named Tom")
            prompt.fill("Once upon a time, a cat named Tom")

            # 3. Ctrl+Enter generates: real model text streams into the panel
            prompt.press("Control+Enter")
            page.wait_for_function(
                """() => { const p = document.querySelector('.realm-panel');
                   return p.querySelector('[data-testid=realm-status]').textContent === 'running'
                     && p.querySelector('[data-testid=realm-text]').textContent.length > 0; }""",
                timeout=120_000, polling=50)
            partial = text.text_content() or ""
            page.wait_for_function(
                "() => document.querySelector('.realm-panel [data-testid=realm-status]')"
                ".textContent === 'done'", timeout=120_000, polling=100)
            final = text.text_content() or ""
            assert final.startswith(partial) and len(final) > len(partial), (partial, final)
            assert sum(ch.isalpha() for ch in final) >= 10, final
            assert python("panel.generation.text.lstrip()") == repr(final)
            assert python("panel.generation.prompt") == repr("Once upon a time, a cat named Tom")
            assert python("panel.generation.model") == "'smollm2-135m'"
            assert page.evaluate(CELLS_STATE) == before, "Ctrl+Enter in the prompt ran a cell"
            tokens = panel.locator("[data-testid=realm-tokens]").text_content() or ""
            n_tokens = int(tokens.split()[0])
            assert n_tokens > 0
            seed = panel.locator("[data-testid=realm-last-seed]").text_content() or ""
            assert seed == f"seed {python('panel.generation.params.seed')}"
            wrap = text.evaluate(WRAPS)
            assert wrap["broken"] == [] and wrap["indent"] < 2, wrap
            panel.screenshot(path=str(ARTIFACTS / "panel.png"))

            # 4. the probability view: each token coloured, hover for the alternatives
            panel.locator("[data-testid=realm-show-probs]").check()
            spans = panel.locator(".realm-token")
            spans.first.wait_for(timeout=10_000)
            assert spans.count() == n_tokens == int(python("len(panel.probs)"))
            colours = spans.evaluate_all("ss => ss.map(s => s.style.backgroundColor)")
            assert all(c.startswith("rgba(") for c in colours) and len(set(colours)) > 1
            word = spans.evaluate_all("ss => ss.findIndex(s => /\\w/.test(s.textContent))")
            assert word >= 0
            spans.nth(word).hover()
            tip = panel.locator("[data-testid=realm-tip]")
            tip.wait_for(state="visible", timeout=5_000)
            alternatives = tip.locator(".realm-tip-alt")
            assert alternatives.count() == 5
            inside = tip.evaluate("""(t) => { const a = t.getBoundingClientRect();
                const b = t.closest('.realm-panel').getBoundingClientRect();
                return a.top >= b.top && a.bottom <= b.bottom; }""")
            assert inside, "the tooltip is cut by the panel's edge"
            assert panel.locator(".realm-legend").is_visible()
            head = tip.locator(".realm-tip-head").text_content() or ""
            assert head.endswith("%") and json.loads(head.rsplit("  ", 1)[0]) == \
                eval(python(f"panel.probs[{word}]['t']"))
            panel.screenshot(path=str(ARTIFACTS / "panel_probs.png"))
            page.mouse.move(0, 0)

            # 5. 420 px wide: rows wrap, the picker shrinks, nothing sticks out
            panel.evaluate("p => { p.style.width = '420px'; }")
            overflow = panel.evaluate("""(p) => {
                const box = p.getBoundingClientRect();
                const out = [...p.querySelectorAll('*')].filter((e) => {
                  const r = e.getBoundingClientRect();
                  return r.width > 0 && !e.closest('.realm-tip') && r.right > box.right + 0.5;
                }).map((e) => e.className || e.tagName);
                const select = p.querySelector('select').getBoundingClientRect();
                return {out, scroll: p.scrollWidth, client: p.clientWidth,
                        width: box.width, select: select.right, right: box.right};
            }""")
            assert overflow["width"] == 420 and overflow["out"] == [], overflow
            assert overflow["scroll"] <= overflow["client"], overflow
            assert overflow["select"] <= overflow["right"], overflow
            panel.screenshot(path=str(ARTIFACTS / "panel_420.png"))

            # 6. the dark theme: the output box stands apart from the panel, text readable
            page.evaluate(SET_THEME, "JupyterLab Dark")
            page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'",
                                   timeout=30_000)
            time.sleep(0.5)
            panel.locator("[data-testid=realm-show-probs]").uncheck()
            box = text.evaluate(COLOURS)
            outer = panel.evaluate(COLOURS)
            assert box["bg"] != outer["bg"], (box, outer)
            assert luminance(box["fg"]) > 0.5 and contrast(box["fg"], box["bg"]) > 7, box
            panel.screenshot(path=str(ARTIFACTS / "panel_dark.png"))
            panel.locator("[data-testid=realm-show-probs]").check()
            spans.nth(word).hover()
            tip.wait_for(state="visible", timeout=5_000)
            panel.screenshot(path=str(ARTIFACTS / "panel_dark_probs.png"))
            page.mouse.move(0, 0)
            page.evaluate(SET_THEME, "JupyterLab Light")
            page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'",
                                   timeout=30_000)
            panel.evaluate("p => { p.style.width = ''; }")

            # 7. Stop halts a running generation
            prompt.fill("Count from one to one thousand: one, two, three,")
            set_max_tokens(1500)
            panel.locator("[data-testid=realm-generate]").click()
            page.wait_for_function(
                """() => { const p = document.querySelector('.realm-panel');
                   return p.querySelector('[data-testid=realm-status]').textContent === 'running'
                     && p.querySelector('[data-testid=realm-text]').textContent.length > 10; }""",
                timeout=120_000, polling=50)
            panel.locator("[data-testid=realm-stop]").click()
            page.wait_for_function(
                "() => document.querySelector('.realm-panel [data-testid=realm-status]')"
                ".textContent === 'stopped'", timeout=60_000, polling=100)
            assert python("panel.generation.finish_reason") == "'cancelled'"
            n = int(python("panel.generation.usage['completion_tokens']"))
            assert 0 < n < 1500
            assert python("panel.running") == "False"
            page.screenshot(path=str(ARTIFACTS / "lab.png"))
            print(f"\nscreenshots of the panel: {ARTIFACTS}/panel*.png")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "panel_failed.png"))
            raise
        finally:
            browser.close()


WRAP_PROMPT = ("Write a long paragraph about the history of resilient Mediterranean "
               "shipbuilding, with unusual words:")  # greedy: "\n\nThe story of ...", 64 tokens
SEED_PROMPT = "Write a sentence about the sea:"


def test_cell_output_reads_as_text_and_its_seed_reproduces_it(lab):
    """`%%realm generate` output wraps at word boundaries with no indent or blank first line, is
    readable in both themes, and the seed saved in the notebook gives the same text again."""
    from playwright.sync_api import sync_playwright

    base, token, served = lab
    name = "wrapped.ipynb"
    (served / name).write_text(_notebook([
        STREAM_CELL, f"%%realm generate -n 64 -t 0 -o w\n{WRAP_PROMPT}",
        f"%%realm generate -n 24 -t 0.9 -o g\n{SEED_PROMPT}"]))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(f"{base}/lab/workspaces/wrapped/tree/{name}?token={token}")
            page.wait_for_function(KERNEL_READY, timeout=120_000, polling=200)
            page.evaluate("() => { window.jupyterapp.commands.execute("
                          "'notebook:run-all-cells'); }")
            page.wait_for_function(ALL_RAN, timeout=300_000, polling=200)
            footer = page.locator(".realm-footer").nth(1)  # the sampled cell's
            footer.wait_for(timeout=30_000)

            def python(expr: str) -> str:
                return str(page.evaluate(PYTHON, expr))

            # wrapped at word boundaries, the model's line breaks kept, no indent or blank line
            out = page.locator(".jp-OutputArea-output .realm-text").first
            wrap = out.evaluate(WRAPS)
            assert wrap["tag"] == "DIV" and wrap["wordBreak"] != "break-all", wrap
            assert wrap["whiteSpace"] == "pre-wrap", wrap
            assert wrap["broken"] == [], f"words split across lines: {wrap['broken']}"
            narrow = out.evaluate(f"(el) => {{ el.style.width = '240px'; const w = ({WRAPS})(el);"
                                  " el.style.width = ''; return w; }")
            assert narrow["soft"] >= 2 and narrow["broken"] == [], narrow
            assert abs(wrap["indent"]) < 2 and wrap["firstLineOffset"] < wrap["lineHeight"], wrap
            g_text = eval(python("w.text"))
            lines = [line for line in g_text.strip().split("\n") if line.strip()]
            assert wrap["text"] == g_text.lstrip() and wrap["hard"] == len(lines) - 1, wrap
            out.screenshot(path=str(ARTIFACTS / "output_wrapped.png"))

            # the footer's seed is the one saved in the notebook, and it reproduces the text
            seed = python("str(g.params.seed)").strip("'")
            assert f"seed {seed} " in (footer.text_content() or "")
            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            deadline = time.monotonic() + 30
            saved = None
            while saved is None and time.monotonic() < deadline:
                cells = json.loads((served / name).read_text())["cells"]
                metas = [o.get("metadata", {}).get("realm_nb") for o in cells[2]["outputs"]]
                saved = next((m for m in metas if m), None)
                time.sleep(0.3)
            assert saved is not None, "the notebook was saved without the output's metadata"
            assert saved["seed"] == saved["params"]["seed"] == seed, (saved["seed"], seed)
            again = python(f"get_ipython().run_cell_magic('realm', 'generate -n 24 -t 0.9 "
                           f"-o g2 --seed {saved['seed']}', {SEED_PROMPT!r}) "
                           "or (g2.text == g.text, g2.token_ids == g.token_ids)")
            assert again == "(True, True)", again

            # readable in the light theme and in the dark one
            light = out.evaluate(COLOURS)
            assert contrast(light["fg"], light["bg"]) > 7, light
            page.evaluate(SET_THEME, "JupyterLab Dark")
            page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'",
                                   timeout=30_000)
            time.sleep(0.5)
            dark = out.evaluate(COLOURS)
            assert luminance(dark["fg"]) > 0.5 and contrast(dark["fg"], dark["bg"]) > 7, dark
            assert out.evaluate(WRAPS)["broken"] == []
            page.locator(".jp-Cell").nth(1).screenshot(path=str(ARTIFACTS / "output_dark.png"))
            page.locator(".jp-Cell").nth(2).screenshot(
                path=str(ARTIFACTS / "output_seed_dark.png"))
            page.evaluate(SET_THEME, "JupyterLab Light")
            page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'",
                                   timeout=30_000)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "output_failed.png"))
            raise
        finally:
            browser.close()


STREAM_CELL = "%load_ext realm_nb\n"
GENERATE = "%%realm generate -n 48 -t 0 -o g\nOnce upon a time, in a small village,"


def _notebook(cells: list[str]) -> str:
    return json.dumps({"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}",
                                  "metadata": {}, "outputs": [], "source": src}
                                 for i, src in enumerate(cells)],
                       "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                   "language": "python"}},
                       "nbformat": 4, "nbformat_minor": 5})


def test_two_notebooks_stream_from_one_runtime(lab):
    """Two notebooks open in JupyterLab stream at the same time from the server's one runtime,
    each as its own tenant, and neither kernel loads JAX."""
    from playwright.sync_api import sync_playwright

    base, token, served = lab
    names = ("alpha.ipynb", "beta.ipynb")
    for name in names:
        (served / name).write_text(_notebook([STREAM_CELL, GENERATE]))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_FLAGS)
        try:
            pages = []
            for name in names:
                # A window (context) and a workspace each: a background tab renders nothing
                # (no animation frames), and each window shows its own notebook in front.
                page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
                page.goto(f"{base}/lab/workspaces/{name[:-6]}/tree/{name}?token={token}")
                page.wait_for_function(KERNEL_READY, timeout=120_000, polling=200)
                pages.append(page)
            for page in pages:  # not awaited: the command's promise ends with the last cell
                page.evaluate("() => { window.jupyterapp.commands.execute("
                              "'notebook:run-all-cells'); }")
            for i, page in enumerate(pages):  # text streams in (the live cursor), in both
                try:
                    page.wait_for_function(  # the live cursor after some text
                        "() => [...document.querySelectorAll('.jp-OutputArea-output')].some("
                        "o => /\\w.*▌/s.test(o.textContent))", timeout=300_000, polling=50)
                except Exception:
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / f"stream_failed_{i}.png"))
                    raise
            for page in pages:
                page.wait_for_function(ALL_RAN, timeout=300_000, polling=200)
                page.get_by_text("finish: length").first.wait_for(timeout=30_000)
            texts = [str(p.evaluate(PYTHON, "g.text")) for p in pages]
            tenants = [str(p.evaluate(PYTHON, "g.tenant")) for p in pages]
            thin = [str(p.evaluate(PYTHON, "'jax' in __import__('sys').modules")) for p in pages]
            assert texts[0] == texts[1] and len(texts[0]) > 20, texts  # greedy: the same text
            assert tenants == [repr(str(served / n)) for n in names], tenants
            assert thin == ["False", "False"]
            shown = pages[1].locator(".jp-OutputArea-output .realm-text").first.text_content() \
                or ""
            assert shown.strip() and eval(texts[1]).strip().startswith(shown.strip()[:20])
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            pages[1].screenshot(path=str(ARTIFACTS / "two_notebooks.png"))
        finally:
            browser.close()
