"""Runs the README's shell examples in order, the way doctest runs a docstring.

What counts as an example:

- a fenced ```sh block: every line is a command (a line ending in a backslash continues on the
  next); each must exit 0. Comments after `#` are the shell's own.
- a fenced ```console block: `$ COMMAND` lines, each followed by the output the README promises
  (stdout and stderr together). Output matches line by line after trailing spaces are dropped;
  runs of spaces match any run of spaces (table columns), `...` inside a line matches any text,
  and a line that is only `...` matches any number of lines.

A block right after `<!-- readme-test: skip: REASON -->` is not run (the agent on a real host,
the Vagrant lab, the test command itself). Other fenced blocks (toml, json, yaml) are text.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line of the command in the README
    command: str
    expected: tuple[str, ...] | None = None  # None: only the exit status is checked


@dataclass
class Block:
    line: int
    lang: str
    body: list[str]
    skip: str | None = None  # the reason, when marked
    examples: list[Example] = field(default_factory=list)


def parse(text: str) -> list[Block]:
    """Every fenced sh/console block of a Markdown text, with its examples."""
    blocks: list[Block] = []
    lines = text.splitlines()
    pending_skip: str | None = None
    i = 0
    while i < len(lines):
        m = SKIP.search(lines[i])
        if m:
            pending_skip = m.group(1)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if not f:
            if lines[i].strip():
                pending_skip = None  # a marker applies to the very next block only
            i += 1
            continue
        start, lang = i + 1, f.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if lang in ("sh", "console"):
            b = Block(start + 1, lang, lines[i + 1:j], pending_skip)
            b.examples = _sh(b) if lang == "sh" else _console(b)
            blocks.append(b)
        pending_skip = None
        i = j + 1
    return blocks


def _sh(b: Block) -> list[Example]:
    out: list[Example] = []
    cmd, first = "", 0
    for n, raw in enumerate(b.body):
        if not cmd and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if not cmd:
            first = b.line + n
        if raw.rstrip().endswith("\\"):
            cmd += raw.rstrip()[:-1] + " "
            continue
        out.append(Example(first, (cmd + raw).strip()))
        cmd = ""
    return out


def _console(b: Block) -> list[Example]:
    out: list[Example] = []
    cmd: str | None = None
    first = 0
    expected: list[str] = []
    for n, raw in enumerate(b.body):
        if raw.startswith("$ "):
            if cmd is not None:
                out.append(Example(first, cmd, tuple(expected)))
            cmd, first, expected = raw[2:].strip(), b.line + n, []
        elif cmd is not None:
            expected.append(raw.rstrip())
    if cmd is not None:
        out.append(Example(first, cmd, tuple(expected)))
    return out


def pattern(expected: tuple[str, ...]) -> re.Pattern[str]:
    """The regular expression that output promised as `expected` must match in full."""
    parts = []
    for line in expected:
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
            continue
        chunks = [re.sub(r"\\ (?:\\ )+", " +", re.escape(c)) for c in line.split("...")]
        parts.append(".*".join(chunks).replace(" +", "[ ]+") + r"[ ]*\n")
    return re.compile("".join(parts))


def matches(expected: tuple[str, ...], output: str) -> bool:
    text = "\n".join(line.rstrip() for line in output.rstrip("\n").splitlines()) + "\n"
    if not expected:
        return True
    return pattern(expected).fullmatch(text) is not None


class ExampleFailed(AssertionError):
    pass


def run(example: Example, cwd: Path, env: Mapping[str, str], timeout: float = 600) -> str:
    """Run one example in bash; raise ExampleFailed saying what the README promised and what came."""
    p = subprocess.run(["bash", "-c", example.command], cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if p.returncode != 0:
        raise ExampleFailed(f"README line {example.line}: `{example.command}` exited {p.returncode}:\n{p.stdout[-3000:]}")
    if example.expected is not None and not matches(example.expected, p.stdout):
        want = "\n".join(example.expected)
        raise ExampleFailed(f"README line {example.line}: `{example.command}` printed:\n{p.stdout[-3000:]}\n"
                            f"but the README shows:\n{want}")
    return p.stdout
