"""Opens every page of the built documentation in headless Chromium, offline.

  sphinx-build -W docs docs/_build/html
  python docs/check_rendering.py docs/_build/html [--screenshots DIR]

needs Chromium (Debian: ``apt-get install chromium``) and nothing else: the
site is served from its folder on 127.0.0.1, as it is (MathJax included), in a
window 1280 pixels wide. A script added to each page as it is served waits for
MathJax and measures the page. A page fails if, while it renders:

* the browser asks for anything but the local site (read from Chromium's own
  log of its network requests): the site must work without a network;
* a formula is not typeset (the page has more math than MathJax rendered, or
  LaTeX is left as text), or MathJax refused one (``merror``);
* a glyph falls back: MathJax draws a character its own font lacks with a
  system font (an SVG ``text`` element), or a web font fails to load;
* content is clipped: an element cut by a box that neither shows it all nor
  scrolls (``overflow`` hidden or clip), or wider than the article column
  with no scrolling box around it.

It prints one line per page and exits 1 if any page fails. ``--screenshots``
also writes a tall screenshot of each page (``page.png``), to look at.
"""

import argparse
import functools
import html
import http.server
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading

# Chromium as Debian names it, as Ubuntu does, and Google's build of it.
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH = 1280
RESULT_ID = "optax-ftml-render-check"

# Runs in each page once it has loaded and MathJax (if any) has typeset it.
MEASURE = """
<script>
(() => {
  const report = (result) => {
    const pre = document.createElement("pre");
    pre.id = "__RESULT_ID__";
    pre.textContent = JSON.stringify(result);
    document.body.appendChild(pre);
  };
  const measure = () => {
    const article = document.querySelector("article") || document.body;
    const column = article.getBoundingClientRect();
    const scrolls = (el) => ["auto", "scroll"].includes(
        getComputedStyle(el).overflowX);
    const describe = (el) => el.tagName.toLowerCase()
        + (el.className && typeof el.className === "string"
           ? "." + el.className.trim().split(/\\s+/).join(".") : "")
        + ": " + (el.textContent || "").trim().slice(0, 60);
    const clipped = [];
    for (const el of article.querySelectorAll("*")) {
      if (el.closest("mjx-container svg") || el.id === "__RESULT_ID__") continue;
      const style = getComputedStyle(el);
      if (style.display === "inline") continue;  // no box of its own
      if (["hidden", "clip"].includes(style.overflowX)
          && el.scrollWidth > el.clientWidth + 1
          && !el.matches(".sr-only, .visually-hidden")) {
        clipped.push(`cut (${el.scrollWidth} px in ${el.clientWidth}): `
                     + describe(el));
        continue;
      }
      const box = el.getBoundingClientRect();
      if (box.width && box.right > column.right + 1) {
        let parent = el.parentElement, scrolled = false;
        while (parent && parent !== article && !scrolled) {
          scrolled = scrolls(parent);
          parent = parent.parentElement;
        }
        if (!scrolled && !(el.parentElement && clipped.length
                           && el.parentElement.getBoundingClientRect().right
                              > column.right + 1))
          clipped.push("past the column: " + describe(el));
      }
    }
    const math = article.querySelectorAll(".math").length;
    const containers = [...document.querySelectorAll("mjx-container")];
    const text = [...article.querySelectorAll("p, li, td, dd")]
        .filter((el) => !el.closest("pre, code, mjx-container"))
        .map((el) => el.textContent).join("\\n");
    return {
      math: math,
      typeset: containers.length,
      errors: [...document.querySelectorAll(
          "mjx-merror, [data-mml-node=merror]")].map(
          (el) => el.getAttribute("data-mjx-error") || "(no message)"),
      fallback_glyphs: containers.flatMap((c) => [...c.querySelectorAll(
          "svg text")].map((t) => t.textContent)),
      raw_latex: (text.match(/\\$\\$|\\\\(begin|frac|left|sqrt)\\b/g) || []),
      failed_fonts: [...document.fonts].filter(
          (f) => f.status === "error").map((f) => f.family),
      clipped: clipped,
    };
  };
  // Polled rather than awaited: whatever the page does, a report comes.
  let typeset = !document.querySelector(".math"), waiting = false;
  const poll = setInterval(() => {
    const mathjax = window.MathJax && window.MathJax.startup;
    if (!typeset && !waiting && mathjax && mathjax.promise) {
      waiting = true;
      mathjax.promise.then(() => { typeset = true; },
                           (error) => report({error: "MathJax failed: " + error}));
    }
    if (document.readyState !== "complete") return;
    // Without MathJax (loaded by then, async scripts included) nothing will
    // typeset the page's math: measure it as it is.
    if (!typeset && !window.MathJax) typeset = true;
    if (!typeset) return;
    clearInterval(poll);
    try {
      report(measure());
    } catch (error) {
      report({error: "the check failed: " + error});
    }
  }, 100);
})();
</script>
""".replace("__RESULT_ID__", RESULT_ID)


class _Handler(http.server.SimpleHTTPRequestHandler):
  """Serves the site, with the measuring script added to each page."""

  def do_GET(self):
    path = pathlib.Path(self.translate_path(self.path))
    if path.suffix != ".html" or not path.is_file():
      return super().do_GET()
    body = path.read_bytes().replace(b"</body>", MEASURE.encode() + b"</body>")
    self.send_response(200)
    self.send_header("Content-Type", "text/html; charset=utf-8")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):
    del format, args


def chromium(binary, work, url, *args):
  """Runs headless Chromium on ``url``; returns its output and the addresses
  it asked for."""
  run = pathlib.Path(tempfile.mkdtemp(dir=work))  # a new profile each time
  netlog = run / "netlog.json"
  # The flags of a browser that starts no connection of its own (updates,
  # sync, ...): whatever is asked for, the page asked for.
  result = subprocess.run(
      [binary, "--headless", "--no-sandbox", "--disable-gpu",
       "--no-first-run", "--disable-background-networking",
       "--disable-component-update", "--disable-sync", "--disable-quic",
       "--disable-default-apps", "--disable-extensions",
       f"--user-data-dir={run / 'profile'}", f"--log-net-log={netlog}",
       "--virtual-time-budget=30000", *args, url],
      capture_output=True, text=True, timeout=180, check=False)
  return result.stdout, page_requests(netlog, url)


def page_requests(netlog, url):
  """The addresses that the page at ``url`` asked for: requests made on behalf
  of its origin (the browser's own, e.g. for updates, have no origin)."""
  log = json.loads(netlog.read_text())
  start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
  origin = re.match(r"[a-z]+://[^/]+", url)[0]
  requests = [event["params"] for event in log["events"]
              if event["type"] == start and "params" in event]
  return {request["url"] for request in requests
          if origin in (request.get("initiator", ""),
                        *request.get("network_isolation_key", "").split())}


def check_page(binary, work, base, page, screenshots=None):
  """The problems of one page, as sentences (none: it renders)."""
  url = f"{base}/{page}"
  dom, requested = chromium(binary, work, url, f"--window-size={WIDTH},900",
                            "--dump-dom")
  problems = [f"asked the network for {address}" for address in
              sorted(requested) if not address.startswith(base + "/")]
  found = re.search(f'<pre id="{RESULT_ID}"[^>]*>(.*?)</pre>', dom, re.S)
  result = json.loads(html.unescape(found[1])) if found else {
      "error": "the page never finished rendering"}
  if "error" in result:
    problems.append(result["error"])
    result = {"typeset": 0, "math": 0, "errors": [], "raw_latex": [],
              "fallback_glyphs": [], "failed_fonts": [], "clipped": []}
  if result["typeset"] < result["math"]:
    problems.append(f"{result['math']} formulas, {result['typeset']} typeset")
  problems += [f"MathJax error: {error}" for error in result["errors"]]
  problems += [f"left as LaTeX: {text}" for text in result["raw_latex"]]
  problems += [f"fallback glyph: {text!r}" for text in result["fallback_glyphs"]]
  problems += [f"web font failed: {font}" for font in result["failed_fonts"]]
  problems += [f"clipped, {text}" for text in result["clipped"]]
  if screenshots is not None:
    target = screenshots / (page.replace("/", "_").removesuffix(".html")
                            + ".png")
    chromium(binary, work, url, f"--window-size={WIDTH},5000",
             f"--screenshot={target}")
  print(f"{page}: {result['typeset']} formulas"
        + "".join(f"\n  {problem}" for problem in problems))
  return problems


def pages(site):
  return sorted(path.relative_to(site).as_posix() for path in site.rglob("*.html")
                if not path.relative_to(site).parts[0].startswith("_")
                and path.name not in ("search.html", "genindex.html"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("site", type=pathlib.Path)
  parser.add_argument(
      "--chromium", default=next(filter(shutil.which, BROWSERS), BROWSERS[0]),
      help=f"the browser: by default the first of {', '.join(BROWSERS)} found")
  parser.add_argument("--screenshots", type=pathlib.Path)
  parser.add_argument("--pages", nargs="+", help="only these pages")
  args = parser.parse_args(argv)
  if args.screenshots:
    args.screenshots.mkdir(parents=True, exist_ok=True)
  server = http.server.ThreadingHTTPServer(
      ("127.0.0.1", 0), functools.partial(_Handler, directory=str(args.site)))
  threading.Thread(target=server.serve_forever, daemon=True).start()
  base = f"http://127.0.0.1:{server.server_port}"
  failed = []
  with tempfile.TemporaryDirectory() as work:
    for page in args.pages or pages(args.site):
      if check_page(args.chromium, pathlib.Path(work), base, page,
                    args.screenshots):
        failed.append(page)
  server.shutdown()
  if failed:
    print(f"{len(failed)} pages do not render as they should: "
          + ", ".join(failed))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
