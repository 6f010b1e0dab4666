"""Sphinx configuration of the optax_ftml documentation."""

import importlib.metadata
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The documented package is the installed one when there is one (as in the
# tests, which check the built wheel), else the source tree beside docs/.
try:
  import optax_ftml
except ImportError:
  sys.path.insert(0, str(ROOT))
  import optax_ftml

project = "optax_ftml"
author = "optax_ftml authors"
copyright = "the optax_ftml authors"
release = optax_ftml.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# Every warning is an error (sphinx-build -W): every reference must resolve.
nitpicky = True
# Names from other projects resolve through their inventories when the build
# can reach them (Read the Docs); offline they are left as plain text.
if os.environ.get("READTHEDOCS") == "True":
  extensions.append("sphinx.ext.intersphinx")
  intersphinx_mapping = {
      "python": ("https://docs.python.org/3", None),
      "numpy": ("https://numpy.org/doc/stable", None),
      "jax": ("https://docs.jax.dev/en/latest", None),
      "optax": ("https://optax.readthedocs.io/en/latest", None),
  }
nitpick_ignore_regex = [
    ("py:.*", r"(jax|optax|numpy|chex|flax)(\..*)?"),
    ("py:.*", r"(collections\.abc|typing)\..*"),
    ("py:.*", r"(Any|Hashable|NamedTuple|int|float|bool|str|tuple|None)"),
]

# API reference: the docstrings, Google style.
autodoc_default_options = {"members": True, "member-order": "bysource"}
# The docstrings say what each argument accepts; the aliases (e.g.
# optax.ScalarOrSchedule) would be printed expanded.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MathJax is served from the built site, so that every formula renders without
# a network (a site opened from its folder, or read offline): MathJax 3's SVG
# output, whose TeX font is in the script itself (no web fonts to fetch), from
# the sphinx-mathjax-offline package (the docs extra).
MATHJAX = importlib.metadata.distribution("sphinx-mathjax-offline").locate_file(
    "sphinx-mathjax-offline/static/mathjax")
mathjax_path = "mathjax/tex-svg.js"


def copy_mathjax(app, exception):
  # The combined tex-svg.js, and the components it loads on demand (TeX
  # extensions, the menu's accessibility tools).
  if exception is None and app.builder.format == "html":
    target = pathlib.Path(app.outdir) / "_static" / "mathjax"
    shutil.copytree(MATHJAX, target, dirs_exist_ok=True, ignore=lambda _, names: [
        n for n in names if n.endswith(("-chtml.js", "-full.js", "-speech.js"))
        or n in ("node-main.js", "mml-svg.js", "tex-mml-svg.js", "chtml")])


# Code, tables and notebook outputs wider than the column scroll (custom.css).
html_static_path = ["_static"]
html_css_files = ["custom.css"]


def setup(app):
  app.connect("build-finished", copy_mathjax)


# MyST Markdown and notebooks.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The notebooks are committed without outputs (another run, another machine,
# other digits): the build executes them, so that their pages show their
# outputs and plots. OPTAX_FTML_NOTEBOOK_STEPS shortens their training runs;
# OPTAX_FTML_DOCS_EXECUTE=0 builds the pages without outputs, in seconds, and
# OPTAX_FTML_DOCS_EXECUTE=quickstart,scale_out executes only those notebooks
# (the tests build the site executing the quickstart, with 30 steps).
NOTEBOOKS = sorted(path.stem for path in (ROOT / "colabs").glob("*.ipynb"))
_execute = os.environ.get("OPTAX_FTML_DOCS_EXECUTE", "")
nb_execution_mode = "off" if _execute == "0" else "force"
if _execute not in ("", "0", "1"):
  _chosen = set(_execute.split(","))
  if not _chosen <= set(NOTEBOOKS):
    raise ValueError(f"OPTAX_FTML_DOCS_EXECUTE={_execute}: the notebooks are"
                     f" {', '.join(NOTEBOOKS)}")
  nb_execution_excludepatterns = [
      f"notebooks/{name}.ipynb" for name in NOTEBOOKS if name not in _chosen]
nb_execution_timeout = 900
nb_execution_raise_on_error = True

html_theme = "sphinx_book_theme"
html_title = "optax_ftml"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
}
