"""Opens the built documentation in headless Chromium and reports MathJax errors.

  sphinx-build -W docs docs/_build/html
  python docs/check_rendering.py docs/_build/html

needs Chromium (Debian: ``apt-get install chromium``) and npm, which fetches
MathJax 4 from the npm registry into a temporary folder, so that the pages
render without the CDN they link to. For each page it prints the number of
formulas MathJax typeset and of those it refused (``mjx-merror``, e.g.
"Erroneous nesting of equation structures"), and exits 1 if any page has an
error or no formula rendered where the page has math.
"""

import argparse
import functools
import http.server
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading

CDN = "https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"
LOCAL = "/node_modules/mathjax/tex-mml-chtml.js"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format, *args):
    del format, args


def served_copy(site, mathjax, folder):
  """A copy of the site loading MathJax from ``mathjax``'s node_modules."""
  shutil.copytree(site, folder, dirs_exist_ok=True)
  (folder / "node_modules").symlink_to(mathjax / "node_modules")
  pages = []
  for page in sorted(folder.rglob("*.html")):
    text = page.read_text()
    if CDN in text:
      page.write_text(text.replace(CDN, LOCAL))
      pages.append(page.relative_to(folder).as_posix())
  return pages


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("site", type=pathlib.Path)
  parser.add_argument("--chromium", default="chromium")
  args = parser.parse_args()
  work = pathlib.Path(tempfile.mkdtemp())
  subprocess.run(["npm", "install", "--silent", "--prefix", str(work / "mj"),
                  "mathjax@4"], check=True)
  pages = served_copy(args.site, work / "mj", work / "site")
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_QuietHandler,
                                          directory=str(work / "site")))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  failed = []
  for page in pages:
    dom = subprocess.run(
        [args.chromium, "--headless", "--no-sandbox", "--disable-gpu",
         "--virtual-time-budget=15000", "--dump-dom",
         f"http://127.0.0.1:{server.server_port}/{page}"],
        capture_output=True, text=True, timeout=120, check=False).stdout
    typeset = len(re.findall(r"<mjx-container", dom))
    errors = re.findall(r"<mjx-merror[^>]*data-mjx-error=\"([^\"]*)\"", dom)
    errors += ["(no message)"] * (len(re.findall(r"<mjx-merror", dom))
                                  - len(errors))
    print(f"{page}: {typeset} formulas, {len(errors)} errors"
          + (f": {sorted(set(errors))}" if errors else ""))
    if errors or not typeset:
      failed.append(page)
  server.shutdown()
  shutil.rmtree(work)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
