"""The documentation: its examples run, and the site builds without a warning."""

import contextlib
import doctest
import importlib
import io
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

import optax_ftml

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
# The README and every Markdown page of the documentation site.
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
# Pages whose blocks form one program (each uses the names the previous ones
# defined): tests/test_mxnet_resume.py runs them in order.
SESSIONS = {DOCS / "guides" / "resuming_mxnet_run.md"}
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
USES_EXTRAS = re.compile(r"^\s*(import|from) (flax|orbax)\b", re.M)


def python_blocks():
  for page in PAGES:
    if page in SESSIONS:
      continue
    name = page.relative_to(ROOT).as_posix()
    for index, block in enumerate(PYTHON_BLOCK.findall(page.read_text())):
      marks = [pytest.mark.extras] if USES_EXTRAS.search(block) else []
      yield pytest.param(block, id=f"{name}-{index}", marks=marks)


# Every module of the package with an example in a docstring.
EXAMPLE_MODULES = sorted(
    ".".join(path.relative_to(ROOT / "optax_ftml").with_suffix("").parts)
    for path in (ROOT / "optax_ftml").rglob("*.py") if ">>> " in path.read_text())


def test_docstring_examples_are_found():
  assert {"_ftml", "mxnet._optimizer", "mxnet._files", "mxnet._schedules",
          "mxnet._resume"} <= set(EXAMPLE_MODULES)


@pytest.mark.parametrize("module", EXAMPLE_MODULES)
def test_docstring_examples(module):
  module = importlib.import_module(f"optax_ftml.{module}")
  with jax.numpy_dtype_promotion("standard"):
    # Empty globals, as in a fresh interpreter: each example imports what it
    # uses.
    result = doctest.testmod(module, globs={}, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0


def test_every_guide_has_examples_found():
  # A changed fence (e.g. ```{code-cell}) must not silently drop the examples.
  found = {param.id.rsplit("-", 1)[0] for param in python_blocks()}
  assert {"README.md", "docs/guides/numerics.md",
          "docs/guides/scaling_out.md",
          "docs/guides/checkpointing.md"} <= found


@pytest.mark.parametrize("block", list(python_blocks()))
def test_python_blocks_run(block, request):
  name = request.node.callspec.id
  with jax.numpy_dtype_promotion("standard"):  # user code, default promotion
    exec(compile(block, name, "exec"), {"__name__": "__main__"})


@pytest.mark.extras
def test_site_builds_without_warnings(tmp_path):
  # -W: every warning (a broken reference, a docstring that does not render)
  # fails the build; --keep-going reports all of them first. The build
  # executes the notebooks; here only the quickstart, with short training
  # runs (test_notebooks.py runs every notebook).
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
       "html", "-d", str(tmp_path / "doctrees"), str(DOCS),
       str(tmp_path / "html")],
      capture_output=True, text=True, timeout=900, check=False,
      env={**os.environ, "OPTAX_FTML_DOCS_EXECUTE": "quickstart",
           "OPTAX_FTML_NOTEBOOK_STEPS": "30"})
  assert result.returncode == 0, result.stderr
  site = tmp_path / "html"

  # The API reference: summary tables first, then ftml, then the rest; every
  # public name documented.
  api = (site / "api.html").read_text()
  documented = re.findall(r'<dt class="sig sig-object py" id="optax_ftml\.(\w+)"',
                          api)
  assert sorted(documented) == sorted(optax_ftml.__all__)
  assert documented[0] == "ftml"
  assert api.index('class="autosummary') < api.index('id="optax_ftml.ftml"')

  # The index page: the toctrees' lists of pages are in the sidebar, not in
  # the body (a few links in the text).
  index = (site / "index.html").read_text()
  body = index[index.index('<article class="bd-article">'):]
  body = body[:body.index("</article>")]
  assert "toctree-l1" not in body and body.count("<a ") < 10

  # An executed notebook's page shows what its cells printed and plotted.
  for notebook in ("quickstart", "migrating_from_mxnet", "scale_out"):
    assert (site / "notebooks" / f"{notebook}.html").exists()
  quickstart = (site / "notebooks" / "quickstart.html").read_text()
  outputs = re.findall(r'<div class="cell_output docutils container">(.*?)'
                       r'</div>\s*</div>', quickstart, re.S)
  assert any("test accuracy" in output for output in outputs)
  images = re.findall(r'<img alt="[^"]*" src="\.\./(_images/\w+\.png)"',
                      quickstart)
  assert images and all((site / image).exists() for image in images)
  # Pictures referenced from outside docs/ are copied into the site.
  assert (site / "_images" / "convergence_1.png").exists()

  # Offline, in a 1280-pixel window: every formula typeset by the site's own
  # MathJax, nothing asked of the network, no glyph falling back, nothing
  # clipped, on every page.
  check = check_rendering(site)
  assert check.returncode == 0, check.stdout + check.stderr
  checked = re.findall(r"^(\S+\.html): (\d+) formulas$", check.stdout, re.M)
  assert len(checked) >= 19
  assert int(dict(checked)["guides/what_ftml_computes.html"]) >= 20


def check_rendering(site):
  browsers = ("chromium", "chromium-browser", "google-chrome")
  assert any(map(shutil.which, browsers)), (
      "docs/check_rendering.py needs Chromium: apt-get install chromium"
      " (.ci/test installs it)")
  return subprocess.run(
      [sys.executable, str(DOCS / "check_rendering.py"), str(site)],
      capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.extras
def test_rendering_check_finds_what_it_checks(tmp_path):
  # Pages that each break one rule, and one that breaks none.
  long_line = "x = 1  # " + "a long comment " * 40
  pages = {
      "network.html": '<img src="http://192.0.2.1/logo.png" alt="">',
      "clipped.html": ('<div style="width: 300px; overflow: hidden">'
                       f'<pre style="white-space: pre">{long_line}</pre></div>'),
      "past_the_column.html": (
          '<div style="width: 300px"><table><tr><td style="white-space: nowrap">'
          f"{long_line}</td></tr></table></div>"),
      "math_not_typeset.html": '<p><span class="math">\\(x^2\\)</span></p>',
      "fine.html": ('<div style="width: 300px; overflow-x: auto">'
                    f'<pre style="white-space: pre">{long_line}</pre></div>'),
  }
  for name, body in pages.items():
    (tmp_path / name).write_text(
        "<!DOCTYPE html><html><body><article style='width: 400px'>"
        f"{body}</article></body></html>")
  check = check_rendering(tmp_path)
  assert check.returncode == 1
  report = dict(re.findall(r"^(\S+)\.html: \d+ formulas((?:\n  .*)*)",
                           check.stdout, re.M))
  assert report["fine"] == ""
  assert "asked the network for http://192.0.2.1/logo.png" in report["network"]
  assert "clipped, cut" in report["clipped"]
  assert "clipped, past the column" in report["past_the_column"]
  assert "1 formulas, 0 typeset" in report["math_not_typeset"]


@pytest.mark.parametrize("page", [ROOT / "README.md",
                                  DOCS / "getting_started.md"],
                         ids=lambda page: page.name)
def test_quick_example_converges_and_shows_its_output(page):
  # The Quick example prints its final loss; the page shows that output.
  text = page.read_text()
  block = next(b for b in PYTHON_BLOCK.findall(text) if "final loss" in b)
  printed = io.StringIO()
  with (contextlib.redirect_stdout(printed),
        jax.numpy_dtype_promotion("standard")):
    exec(compile(block, f"{page.name}-quick", "exec"), {"__name__": "__main__"})
  (value,) = re.findall(r"^final loss (\S+)$", printed.getvalue(), re.M)
  assert float(value) < 1e-8, printed.getvalue()
  (shown,) = re.findall(r"^```text\nfinal loss (\S+)\n```", text, re.M)
  assert float(shown) < 1e-8


# LaTeX environments that number or align whole displays: Sphinx wraps a
# docstring's math block in \begin{split}, and MyST pages' $$ blocks are
# displays already, where MathJax refuses them ("Erroneous nesting of
# equation structures"). Inside a display, use aligned, gathered, cases.
DISPLAY_ENVIRONMENT = re.compile(
    r"\\begin\{(align|equation|gather|multline|eqnarray|flalign)\*?\}")


def math_sources():
  for page in PAGES:
    yield page.relative_to(ROOT).as_posix(), page.read_text()
  for name in optax_ftml.__all__:
    yield f"optax_ftml.{name}", getattr(optax_ftml, name).__doc__ or ""


def test_math_blocks_use_environments_mathjax_accepts_in_a_display():
  offending = [name for name, text in math_sources()
               if DISPLAY_ENVIRONMENT.search(text)]
  assert not offending, offending
  # The check sees what it checks: the ftml docstring has an aligned display.
  assert r"\begin{aligned}" in (optax_ftml.ftml.__doc__ or "")
