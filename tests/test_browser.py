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

pytestmark = pytest.mark.browser


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


def test_panel_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    base, token, _ = lab
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
            status = panel.locator("[data-testid=realm-status]")
            text = panel.locator("[data-testid=realm-text]")

            # 1. choose a model in the picker: Python sees it
            picker = panel.locator("[data-testid=realm-model]")
            options = picker.locator("option").evaluate_all("os => os.map(o => o.value)")
            assert "smollm2-135m" in options and "smollm2" in options, options
            picker.select_option("smollm2")
            deadline = time.monotonic() + 20
            while python("panel.model") != "'smollm2'" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert python("panel.model") == "'smollm2'"

            # 2. Generate streams real model text into the panel
            panel.locator("[data-testid=realm-prompt]").fill("Once upon a time, a cat named Tom")
            max_tokens = panel.locator("[data-testid=realm-max-tokens]")

            def set_max_tokens(n: int) -> None:
                """Type a value into the panel and wait until Python's trait holds it."""
                max_tokens.fill(str(n))
                max_tokens.press("Tab")
                deadline = time.monotonic() + 20
                while python("panel.max_tokens") != str(n) and time.monotonic() < deadline:
                    time.sleep(0.2)

            set_max_tokens(60)
            panel.locator("input.realm-chat").uncheck()
            panel.locator("[data-testid=realm-generate]").click()
            page.wait_for_function(
                """() => { const p = document.querySelector('.realm-panel');
                   return p.querySelector('[data-testid=realm-status]').textContent === 'running'
                     && p.querySelector('[data-testid=realm-text]').textContent.length > 0; }""",
                timeout=120_000, polling=50)
            partial = text.text_content() or ""
            assert status.text_content() == "running" or len(partial) > 0
            page.wait_for_function(
                "() => document.querySelector('.realm-panel [data-testid=realm-status]')"
                ".textContent === 'done'", timeout=120_000, polling=100)
            final = text.text_content() or ""
            assert final.startswith(partial) and len(final) > len(partial), (partial, final)
            assert sum(ch.isalpha() for ch in final) >= 10, final
            assert python("panel.generation.text") == repr(final)
            assert python("panel.generation.model") == "'smollm2-135m'"
            tokens = panel.locator("[data-testid=realm-tokens]").text_content() or ""
            assert int(tokens.split()[0]) > 0
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "panel.png"
            panel.screenshot(path=str(shot))
            print(f"\nscreenshot of the panel: {shot}")

            # 3. Stop halts a running generation
            panel.locator("[data-testid=realm-prompt]").fill(
                "Count from one to one thousand: one, two, three,")
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
            print(f"screenshot of the page: {ARTIFACTS / 'lab.png'}")
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
            shown = pages[1].locator(".jp-OutputArea-output pre").first.text_content() or ""
            assert shown.strip() and eval(texts[1]).strip().startswith(shown.strip()[:20])
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            pages[1].screenshot(path=str(ARTIFACTS / "two_notebooks.png"))
        finally:
            browser.close()
