"""DOT to pictures with Graphviz's ``dot``, and the HTML pages around the SVG.

``dot`` runs as a child process with a deadline: a Python wrapper would add a dependency for a
few lines, and a subprocess can be stopped when a huge map takes too long.
"""

from __future__ import annotations

import base64
import hashlib
import html
import shutil
import subprocess

FORMATS = ("svg", "png", "html", "dot")
TIMEOUT = 60.0
MAX_OUTPUT = 64 << 20  # a picture larger than this is not a picture anyone can look at


class RenderError(RuntimeError):
    """dot is missing, failed or took too long; the message is one line for the user."""


def render(dot_text: str, fmt: str, timeout: float = TIMEOUT) -> bytes:
    """``svg`` or ``png`` bytes of ``dot_text``, drawn by the dot binary."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"dot renders svg or png, not {fmt}")
    binary = shutil.which("dot")
    if binary is None:
        raise RenderError("Graphviz's dot is not installed (Debian and Ubuntu: apt-get install graphviz)")
    try:
        done = subprocess.run([binary, f"-T{fmt}"], input=dot_text.encode("utf-8", "replace"), capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RenderError(f"dot did not finish within {timeout:.0f} s: "
                          "draw less with --namespace or --max-edges") from None
    except OSError as exc:
        raise RenderError(f"cannot run {binary}: {exc}") from exc
    if done.returncode != 0 or not done.stdout:
        first = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[0]
        raise RenderError(f"dot failed (exit code {done.returncode}): {first}")
    if len(done.stdout) > MAX_OUTPUT:
        raise RenderError(f"the picture is over {MAX_OUTPUT >> 20} MiB: draw less with --namespace or --max-edges")
    return done.stdout


def inline(svg: bytes) -> str:
    """The SVG element alone, for a page: without the XML declaration and doctype dot writes first."""
    text = svg.decode("utf-8", "replace")
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


STYLE = """
body { margin: 0; font: 14px/1.4 Helvetica, Arial, sans-serif; color: #1f2733; background: #fff; }
header { padding: 8px 16px; border-bottom: 1px solid #e3e8ef; color: #6b7785; }
header b { color: #1f2733; }
#status.stale { color: #d62728; }
main { padding: 8px; overflow: auto; }
main svg { max-width: 100%; height: auto; }
"""

# The page fetches a fresh SVG every few seconds and swaps it in: no reload, no flicker. If a
# fetch fails the last picture stays and the header says so.
SCRIPT = """
const every = EVERY_MS, map = document.getElementById('map'), status = document.getElementById('status');
async function refresh() {
  try {
    const answer = await fetch('map.svg', {cache: 'no-store'});
    const text = await answer.text();
    if (!answer.ok) throw new Error(text.trim() || answer.statusText);
    const svg = new DOMParser().parseFromString(text, 'image/svg+xml').documentElement;
    if (svg.nodeName !== 'svg') throw new Error('not an SVG picture');
    map.replaceChildren(document.importNode(svg, true));
    status.textContent = 'updated ' + new Date().toLocaleTimeString();
    status.className = '';
  } catch (error) {
    status.textContent = 'not updated: ' + error.message;
    status.className = 'stale';
  } finally {
    setTimeout(refresh, every);
  }
}
setTimeout(refresh, every);
"""


def page(svg: bytes, title: str, every: float | None = None) -> str:
    """One self-contained HTML page with the SVG inline; with ``every``, it refreshes itself."""
    script = f"<script>{SCRIPT.replace('EVERY_MS', str(int(every * 1000)))}</script>" if every else ""
    note = f" · refreshes every {every:g} s · <span id=\"status\">loaded</span>" if every else ""
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>flowmap · {html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><header><b>flowmap</b> · {html.escape(title)}{note}</header>\n"
            f"<main id=\"map\">{inline(svg)}</main>{script}</body></html>\n")


def script_hash(every: float) -> str:
    """The CSP source of the page's one script, so that no other script can run on the page."""
    body = SCRIPT.replace("EVERY_MS", str(int(every * 1000))).encode()
    return "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
