"""The README and the pages under docs/: the README stays short, its Quick start is the two make
commands, every relative link leads to a file (and heading) that exists, every page opens with what a
reader came for, and every ``python main.py`` command they show is accepted by its mode's parser."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300
QUICK_START = ["make demo", "make test"]
# Pages being written now: links to them may dangle until they land. Remove a name once its page exists.
PENDING_PAGES: set[str] = set()


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "bench" / "README.md"]


def prose(text: str) -> str:
    """``text`` with fenced code blocks blanked (their lines kept, so line numbers stay right)."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n") + len(heading)
    end = re.search(r"^## ", text[start:], flags=re.M)
    return text[start:start + end.start()] if end else text[start:]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), flags=re.M)}


def links(path: Path) -> list[tuple[str, str]]:
    """(target, anchor) of each relative Markdown link or image in ``path``, outside code."""
    found = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(path.read_text()))
    out = []
    for target in found:
        if re.match(r"[a-z]+:", target):            # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        out.append((file, anchor))
    return out


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail to a page under docs/"


def test_quick_start_is_the_two_make_commands():
    blocks = re.findall(r"^```bash\n(.*?)^```", section(README.read_text(), "## Quick start"), flags=re.M | re.S)
    assert len(blocks) == 1
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert [c for c in commands if c] == QUICK_START
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"the Makefile has no '{target}' target"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_existing_files_and_headings(page):
    broken = []
    for file, anchor in links(page):
        target = (page.parent / file).resolve() if file else page
        name = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else str(target)
        if not target.exists():
            if name not in PENDING_PAGES:
                broken.append(f"{file}: no such file")
            continue
        if anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{file}#{anchor}: no such heading in {name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_pending_pages_are_only_the_missing_ones():
    """Once a pending page exists, its name leaves PENDING_PAGES, so links to it are checked."""
    assert not [name for name in PENDING_PAGES if (ROOT / name).exists()], "remove landed pages from PENDING_PAGES"


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / file).resolve() for file, _ in links(README) if file}
    assert not [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert all((ROOT / name).resolve() in linked for name in PENDING_PAGES)


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_each_page_opens_with_a_title_and_what_it_is_for(page):
    lines = [ln for ln in page.read_text().splitlines() if ln.strip()]
    assert lines[0].startswith("# "), f"{page.name} does not start with a '# ' title"
    assert re.match(r"[A-Z`*\[]", lines[1]) and not lines[1].startswith(("```", "|", "#")), \
        f"{page.name}: the title is not followed by a sentence on what the page is for"


# ---------------------------------------------------------------- the commands shown are accepted

def shown_commands() -> list[tuple[str, str]]:
    """(page, command) for every ``python main.py --mode ...`` line in code blocks and inline code,
    continuation lines joined; commands with ``[optional]`` or ``a|b`` placeholders are left out."""
    out = []
    for page in pages():
        text = page.read_text()
        code = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S))
        code = re.sub(r"\\\n\s*", " ", code)
        candidates = code.splitlines() + re.findall(r"`(python main\.py --mode [^`\n]*)`", prose(text))
        for line in candidates:
            line = re.sub(r"^.*?(?=\S*main\.py\"? --mode )", "", line) if "main.py\" --mode" in line or \
                "main.py --mode" in line else ""
            if not line or re.search(r"\[|\||\.\.\.", line.split(" #")[0]):
                continue
            out.append((page.relative_to(ROOT).as_posix(), line.split(" #")[0].strip()))
    return out


def parse_command(command: str) -> None:
    """Parse ``command`` (from ``main.py`` on) as main.py would, raising on an unknown or bad option."""
    from seqmatchnet.cli import compare, demo, extract, options, prepare

    words = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", command))[1:]     # <seqnet run>: one word
    mode = words[words.index("--mode") + 1]
    rest = [w for i, w in enumerate(words) if words[i - 1:i + 1] != ["--mode", mode] and w != "--mode"]
    own = {"extract": extract.parse_args, "prepare": prepare.parse_args, "demo": demo.parse_args,
           "compare": compare._parse_compare}
    parsers = {"extract": extract.build_parser, "prepare": prepare.build_parser}
    known = parsers.get(mode, options.build_parser)()._option_string_actions
    if mode in ("demo", "compare"):
        known = {}                                  # their parsers are built inside parse_args
    given = rest if mode in own else words
    spelled = [w.split("=")[0] for w in given if w.startswith("--") and w.split("=")[0] not in known]
    assert not known or not spelled, f"options spelled otherwise than main.py's (argparse takes prefixes): {spelled}"
    if mode in own:
        own[mode](rest)
    else:
        options.parse_options(words)


def test_documented_commands_are_found():
    found = shown_commands()
    modes = {re.search(r"--mode (\w+)", c).group(1) for _, c in found}
    assert {"train", "test", "localize", "extract", "prepare", "demo", "compare"} <= modes, modes


@pytest.mark.parametrize("page, command", shown_commands())
def test_documented_commands_parse(page, command):
    try:
        parse_command(command)
    except SystemExit as exc:       # argparse of the shared options prints its error and exits
        pytest.fail(f"{page}: `{command}` is refused by main.py's parser (exit {exc.code})")
