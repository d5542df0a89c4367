"""The documentation: README.md stays short, its test command is the one CI runs, and every relative link in
README.md and docs/*.md points to a file that exists and, with a #anchor, to a heading in it."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 10_000
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, …


def prose_lines(text: str, blank_code_spans: bool = True):
    """(line number, line) outside fenced code blocks, inline code spans blanked out unless told otherwise."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        yield number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line) if blank_code_spans else line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation other than '-' and '_' removed,
    spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()                   # inline HTML
    text = re.sub(r"[^\w\- ]", "", text)                          # \w is Unicode: letters, digits, '_'
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, duplicates numbered -1, -2 … as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code_spans=False):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path):
    """(line number, target) of every link and image in a Markdown file, outside code."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            yield number, match.group(1).strip("<>")


def broken(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        linked = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
            continue
        if anchor:
            if linked.suffix.lower() != ".md" or linked.is_dir():
                problems.append(f"{where}: #{anchor} in a file that is not Markdown")
            elif unquote(anchor).lower() not in anchors(linked):
                problems.append(f"{where}: no heading with anchor #{anchor} in {linked.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = broken(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_at_most_10_kb():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to docs/"


def test_readme_test_command_is_the_one_ci_runs():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    ci_test = [line for line in commands if "pytest" in line]
    assert len(ci_test) == 1, f".ci/run should run pytest once, found {ci_test}"
    readme_lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    assert ci_test[0] in readme_lines, (
        f"the README's test command is not the one .ci/run runs: {ci_test[0]!r} is not a line of README.md")


def test_slug_is_githubs():
    assert slug("Limits, errors, TLS and tokens") == "limits-errors-tls-and-tokens"
    assert slug("Pictures and precision: figures measured here (2026-11-29, evening)") == (
        "pictures-and-precision-figures-measured-here-2026-11-29-evening")
    assert slug("Node.js") == "nodejs"
    assert slug("Fault injection (tests only)") == "fault-injection-tests-only"
    assert slug("`nst_client` and snake_case") == "nst_client-and-snake_case"
    assert slug("Figures measured here (earlier, with `torch.optim.LBFGS`)") == (
        "figures-measured-here-earlier-with-torchoptimlbfgs")


def test_link_checker_finds_broken_links(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "README.md").write_text("# Title\n\n## A section\n", encoding="utf-8")
    page.write_text("# Page\n\n[ok](../README.md#a-section) [ok](#page) ![img](missing.png) "
                    "[bad](../README.md#nope) [web](https://example.com/x.md) [mail](mailto:a@b.c)\n"
                    "`[code](not-a-link.md)`\n\n```\n[fenced](not-a-link.md)\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    problems = broken(page)
    assert len(problems) == 2, problems
    assert "missing.png" in problems[0] and "#nope" in problems[1]


PARAMETER_ROW = re.compile(r"^\| `(\w+)`(?: / `(--[\w-]+)[^`]*`)?[^|]*\|")


def parameter_rows(text: str) -> list[tuple[str, str | None]]:
    """(proto field, CLI flag or None) of each row of the table under "## Parameters" in docs/algorithm.md."""
    section = text.split("\n## Parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    parsed = [PARAMETER_ROW.match(line) for line in rows]
    assert all(parsed), [line for line, match in zip(rows, parsed) if not match]
    return [match.groups() for match in parsed]


def test_the_parameter_table_has_a_row_per_request_control_naming_its_flag():
    """docs/algorithm.md's parameter table: a row for every control of StylizeRequest (every field of
    nst_client.StylizeOptions) naming the ``nst stylize`` flag the CLI builds for it, and no row for a field the
    request does not have (the image fields may have rows: ``styles`` / ``--style FILE:WEIGHT``)."""
    import dataclasses

    from nst_client import StylizeOptions, cli
    from nst_client.options import IMAGE_FIELDS
    stylize = cli.build_parser()._subparsers._group_actions[0].choices["stylize"]
    flags = {action.dest: action.option_strings[0] for action in stylize._actions if action.option_strings}
    controls = [field.name for field in dataclasses.fields(StylizeOptions)]
    rows = parameter_rows((ROOT / "docs" / "algorithm.md").read_text(encoding="utf-8"))
    assert sorted({name for name, _ in rows} - set(IMAGE_FIELDS)) == sorted(controls)
    for name, flag in rows:
        if name in controls:
            assert flag == flags[name], f"docs/algorithm.md: the row of {name} names {flag}, nst has {flags[name]}"
    assert [name for name, _ in rows if name in controls].count("preset") == 2      # one row per preset
    assert len([name for name, _ in rows if name in controls]) == len(controls) + 1


def test_parameter_rows_are_read_as_meant():
    table = ("\n## Parameters\n\n| parameter (proto / CLI) | meaning |\n|---|---|\n"
             "| `max_side_px` / `--size` | longest side |\n| `styles` / `--style FILE:WEIGHT` (repeatable) | more |\n"
             "| `progress_every` | a Progress |\n\n## Next\n\n| `other` | x |\n")
    assert parameter_rows(table) == [("max_side_px", "--size"), ("styles", "--style"), ("progress_every", None)]
