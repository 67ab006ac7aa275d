"""The documentation against the code: every `mlsp` command shown in README.md, docs/ and
features/README.md names a real command and only options it has, each command's --help runs,
and every relative link points at a file that exists."""

import glob
import os
import re
import shlex

import pytest
from click.testing import CliRunner

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "features", "README.md")]
              + glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _code_lines(text: str):
    """The lines of a document's ``` blocks, continuation lines (a trailing backslash) joined."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        yield from joined.splitlines()


def _inline_commands(text: str):
    """`mlsp ...` in inline code spans of the prose."""
    for span in re.findall(r"`(mlsp [^`]+)`", text):
        yield span


def _words(line: str):
    """The words of the `mlsp` command on a shell line (after env assignments, before # | && ;)."""
    line = line.split(" #", 1)[0].strip()
    if line.startswith("#"):
        return None
    for sep in ("|", "&&", ";"):
        line = line.split(sep, 1)[0]
    try:
        words = shlex.split(line)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if not words or words[0] != "mlsp":
        return None
    return words[1:]


def commands_shown():
    found = []
    for path in DOCS:
        text = open(path, encoding="utf-8").read()
        for line in list(_code_lines(text)) + list(_inline_commands(text)):
            words = _words(line)
            if words is not None:
                found.append((os.path.relpath(path, ROOT), line.strip(), words))
    return found


def _options(command) -> set:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(getattr(param, "opts", []))
        names.update(getattr(param, "secondary_opts", []))
    return names


SHOWN = commands_shown()


def test_the_docs_show_commands():
    shown = {words[0] for _, _, words in SHOWN if words and not words[0].startswith("-")}
    assert {"extract", "train", "score", "sample"} <= shown, shown


@pytest.mark.parametrize("where,line,words", SHOWN, ids=[f"{w}:{l[:60]}" for w, l, _ in SHOWN])
def test_every_command_shown_exists_with_its_options(where, line, words):
    group_options = _options(cli.main)
    i = 0
    while i < len(words) and words[i].startswith("-"):  # mlsp -v / --backend torch / --help
        option = words[i].split("=", 1)[0]
        assert option in group_options or re.fullmatch(r"-v+", option), f"{where}: `{line}`: mlsp has no {option}"
        i += 1 if (option in ("-v", "-vv", "--help", "-h", "--version") or "=" in words[i]) else 2
    if i >= len(words) or words[i] in ("COMMAND", "…", "..."):
        return
    name = words[i]
    command = cli.main.commands.get(name)
    assert command is not None, f"{where}: `{line}`: no command {name!r} (have: {', '.join(cli.main.commands)})"
    options = _options(command)
    for word in words[i + 1:]:
        if word.startswith("--") or re.fullmatch(r"-[a-zA-Z]", word):
            option = word.split("=", 1)[0]
            assert option in options, f"{where}: `{line}`: `mlsp {name}` has no option {option}"


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli.main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, ROOT) for p in DOCS])
def test_relative_links_resolve(path):
    text = open(path, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        assert os.path.exists(os.path.join(os.path.dirname(path), target)), f"{path}: broken link {target}"


def test_readme_is_a_front_door():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details into docs/"
    # the install and the test commands together, near the top: one code block of Set up
    install = next(k for k, line in enumerate(lines) if line.startswith("python3 -m venv") and "pip install" in line)
    tests = [k for k, line in enumerate(lines) if line.startswith("python -m pytest")]
    assert install < 60 and tests and all(0 < k - install <= 4 for k in tests), (install, tests)
    assert any('-m "not slow"' in lines[k] for k in tests), "the fast tier's command"


def test_citations_of_the_paper_point_at_headings_of_docs_paper():
    """Code, tests and bench cite the paper as docs/paper.md and a heading in double quotes: each heading exists
    there, and nothing cites a file the repository does not hold."""
    with open(os.path.join(ROOT, "docs", "paper.md"), encoding="utf-8") as handle:
        headings = set(re.findall(r"^## (.+)$", handle.read(), flags=re.M))
    cited, missing = 0, []
    for pattern in ("mlsp/**/*.py", "heads/**/*.py", "cli.py", "tests/*.py", "bench/*.py"):
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            assert "PAPER" + ".md" not in text, f"{path} cites a file outside the repository"
            for heading in re.findall(r'docs/paper\.md, "([^"]+)"', text):
                cited += 1
                if heading not in headings:
                    missing.append(f"{os.path.relpath(path, ROOT)}: {heading!r}")
    assert missing == [], f"headings of docs/paper.md: {sorted(headings)}"
    assert cited >= 5  # the check reads the citations
