"""What ``docker build .`` sends of a folder: the rules of its ``.dockerignore``, read as Docker
reads them (moby's patternmatcher), so the local image builds (flowmap_devenv.images) and the
tests of the context (tests/manifests/test_image.py) see the files the Dockerfile sees."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    text: str  # as written, cleaned: no "!", no leading or trailing "/"
    pattern: re.Pattern[str]
    negated: bool  # "!...": let back in what an earlier line left out


def pattern(text: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regular expression."""
    out, i = "", 0
    while i < len(text):
        if text.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif text.startswith("**", i):
            out, i = out + ".*", i + 2
        elif text[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif text[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(text[i]), i + 1
    return re.compile(out)


def rules(text: str) -> list[Rule]:
    """The lines of a .dockerignore, in order (comments and blank lines dropped)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            clean = os.path.normpath(line.lstrip("!").strip().strip("/"))
            found.append(Rule(clean, pattern(clean), negated))
    return found


def excluded(ruleset: list[Rule], path: str) -> bool:
    """Whether ``path`` (relative, ``/``-separated) stays out: the last line matching it or one of
    its folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for rule in ruleset:
        if any(rule.pattern.fullmatch(p) for p in prefixes):
            out = not rule.negated
    return out


def context(root: Path) -> list[str]:
    """The files sent from ``root``, relative and ``/``-separated. An excluded folder is not entered
    unless a "!" line names a path inside it (Docker's rule, which keeps the walk out of .git,
    virtualenvs and build trees)."""
    ignore = root / ".dockerignore"
    ruleset = rules(ignore.read_text()) if ignore.is_file() else []
    sent = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not excluded(ruleset, prefix + d)
                   or any(r.negated and (r.text + "/").startswith(prefix + d + "/") for r in ruleset)]
        sent += [prefix + f for f in files if not excluded(ruleset, prefix + f)]
    return sorted(sent)
