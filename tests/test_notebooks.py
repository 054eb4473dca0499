"""The demo notebooks as committed: run, with their outputs, nothing private in them, plain glyphs.

nbval (`--nbval-lax`, pyproject's addopts) runs them again in the test suite; this file checks what
a reader sees without running anything: every code cell was executed and kept its output, no
output names a path of the machine that ran it or carries a key, every character is one any
browser font has, the plots are there, and the README links each notebook and launches them on a
BinderHub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PLOTS = {"01_quickstart.ipynb": "token probabilities", "05_performance.ipynb": "tok/s by tenants",
         "06_models.ipynb": "perplexity per text and model"}

# Absolute paths of a machine (a home, the temp dir, a checkout), keys and tokens.
PRIVATE = [
    (re.compile(r"(?<![\w.:/])/(?:root|home|tmp|work|Users|var/folders)/"), "an absolute path"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "an API key"),
    (re.compile(r"(?i)(?:api[_-]?key|token|secret)[\"']?\s*[=:]\s*[\"']?[0-9a-f]{16,}"),
     "a key or token"),
    (re.compile(r"(?i)bearer\s+[A-Za-z0-9._-]{12,}"), "a bearer token"),
]


def plain_glyph(ch: str) -> bool:
    """Latin letters and common punctuation: what every browser font draws (no emoji, no blocks)."""
    o = ord(ch)
    return o < 0x180 or 0x2010 <= o <= 0x2027


def outputs_text(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                parts.append("".join(out["text"]))
            elif out["output_type"] == "error":
                parts.append(f"{out['ename']}: {out['evalue']}")
            else:
                for kind, value in out.get("data", {}).items():
                    if kind.startswith("text/") or kind.endswith("json"):
                        parts.append(value if isinstance(value, str) else
                                     json.dumps(value) if not isinstance(value, list)
                                     else "".join(value))
                parts.append(json.dumps(out.get("metadata", {})))
    return "\n".join(parts)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_demo_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for required in ("01_quickstart.ipynb", "05_performance.ipynb"):
        assert required in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_outputs(path: Path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unrun, (f"{path.name}: code cells {unrun} were not run; execute it before "
                       "committing: jupyter nbconvert --to notebook --execute --inplace")
    assert any(c.get("outputs") for c in code), f"{path.name} holds no outputs"
    errors = [o["ename"] for c in code for o in c.get("outputs", [])
              if o["output_type"] == "error"]
    assert not errors, f"{path.name} was committed with errors: {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_hold_nothing_private(path: Path):
    text = outputs_text(load(path))
    for pattern, what in PRIVATE:
        found = pattern.search(text)
        assert found is None, (f"{path.name}: an output holds {what}: "
                               f"{text[max(0, found.start() - 40):found.end() + 40]!r}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_use_plain_glyphs(path: Path):
    odd = sorted({f"U+{ord(ch):04X}" for ch in outputs_text(load(path)) if not plain_glyph(ch)})
    assert not odd, f"{path.name}: outputs use characters a browser font may lack: {odd}"


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_plot_is_committed(name: str):
    images = [o for c in load(REPO / "notebooks" / name)["cells"] for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{name} should show its plot ({PLOTS[name]}) as a committed PNG"


def test_readme_links_each_notebook_and_launches_binder():
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"](notebooks/{path.name})" in readme, f"README.md does not link {path.name}"
    badge = re.search(r"\[!\[[^\]]*Binder[^\]]*\]\((?P<img>[^)\s]+)\)\]\((?P<url>[^)\s]+)\)",
                      readme)
    assert badge, "README.md has no Binder badge ([![...Binder...](image)](launch link))"
    assert "/v2/gh/" in badge["url"] and "labpath=notebooks" in badge["url"], badge["url"]
    assert badge["img"].endswith("badge_logo.svg"), badge["img"]
