"""tests.readme_runner: which README blocks are examples, and how promised output is matched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.readme_runner import Example, ExampleFailed, matches, parse, run

DOC = """\
# title

```sh
echo one          # a comment
# a whole-line comment

echo two \\
  three
```

<!-- readme-test: skip: needs a real host -->
```sh
systemctl start wiremesh
```

```toml
not = "run"
```

```console
$ printf 'NODE   STATUS\\nnode1  ok\\n'
NODE   STATUS
node1  ok
$ true
```
"""


def test_parse_finds_sh_and_console_examples_in_order() -> None:
    blocks = parse(DOC)
    assert [b.lang for b in blocks] == ["sh", "sh", "console"]
    assert [e.command for e in blocks[0].examples] == ["echo one          # a comment", "echo two    three"]
    assert blocks[0].examples[0].line == 4
    assert blocks[1].skip == "needs a real host"
    assert blocks[0].skip is None and blocks[2].skip is None
    assert blocks[2].examples[0].expected == ("NODE   STATUS", "node1  ok")
    assert blocks[2].examples[1] == Example(blocks[2].examples[1].line, "true", ())


def test_a_skip_marker_applies_only_to_the_next_block() -> None:
    blocks = parse("<!-- readme-test: skip: x -->\n\ntext between\n```sh\necho hi\n```\n")
    assert blocks[0].skip is None


@pytest.mark.parametrize("expected,output,ok", [
    (("a  b",), "a     b\n", True),
    (("a  b",), "a b c\n", False),
    (("hs ...s ago",), "hs 3s ago\n", True),
    (("first", "...", "last"), "first\nx\ny\nlast\n", True),
    (("first", "...", "last"), "first\nlast\n", True),
    (("first", "last"), "first\nextra\nlast\n", False),
    (("only",), "only   \n\n", True),
    (("a.b",), "axb\n", False),
])
def test_matching_is_exact_except_spaces_and_ellipses(expected: tuple[str, ...], output: str, ok: bool) -> None:
    assert matches(expected, output) is ok


def test_run_reports_the_readme_line_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ExampleFailed, match="README line 7: `exit 3` exited 3"):
        run(Example(7, "exit 3"), tmp_path, {"PATH": "/usr/bin:/bin"})
    with pytest.raises(ExampleFailed, match="but the README shows:\nbye"):
        run(Example(9, "echo hello", ("bye",)), tmp_path, {"PATH": "/usr/bin:/bin"})
    assert run(Example(1, "echo hello", ("hello",)), tmp_path, {"PATH": "/usr/bin:/bin"}) == "hello\n"
