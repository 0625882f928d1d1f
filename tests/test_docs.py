"""The README is a front page and docs/ the reference: every flag of every command has its row in
docs/flags.md, the tables are what the parsers give, and every link reaches its file and heading."""
import glob
import os
import re
import subprocess
import sys

from conftest import REPO
from tools.flag_docs import COMMANDS, SECTIONS, documented_actions

README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
FLAGS_PAGE = os.path.join(DOCS, "flags.md")
MAX_README_LINES = 300
MIN_DOCS_PAGES = 4
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    with open(path) as f:
        return f.read()


def without_code(text):
    """The text without fenced code blocks, whose `#` lines are comments and whose brackets are code."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchor(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text):
    """Every heading's anchor; a repeated heading gets -1, -2, ... as on GitHub."""
    seen = {}
    result = set()
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(text), flags=re.M):
        base = anchor(heading)
        result.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return result


def section_rows(page, section):
    """``{first cell: meaning}`` of the table under the section's heading in docs/flags.md."""
    heading = "### " + ", ".join(f"`{command.line}`" for command in section.commands)
    assert heading in page.splitlines(), f"docs/flags.md has no heading {heading!r}: run python -m tools.flag_docs"
    body = page.split(heading + "\n", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0].startswith("`"):
            rows[cells[0]] = cells[-1]
    return rows


def flag_names(cell):
    """The names in a first cell: `-j`, `--workers` and `--compile [BACKEND]` give -j, --workers, --compile."""
    return [code.split()[0] for code in re.findall(r"`([^`]+)`", cell)]


def test_every_flag_of_every_command_has_its_row():
    page = read(FLAGS_PAGE)
    for section in SECTIONS:
        rows = section_rows(page, section)
        meanings = {name: meaning for cell, meaning in rows.items() for name in flag_names(cell)}
        documented = set(meanings)
        in_parsers = set()
        for command in section.commands:
            for action in documented_actions(command.build_parser()):
                for name in action.option_strings or [action.dest]:
                    in_parsers.add(name)
                    assert name in documented, (f"{command.line} {name} has no row in docs/flags.md: "
                                                f"run python -m tools.flag_docs")
                    assert meanings[name], f"{command.line} {name}: give the flag a help text"
        assert documented <= in_parsers, f"docs/flags.md documents flags no parser has: {documented - in_parsers}"


def test_every_command_line_is_listed():
    """A new tool (a module of tools/ that runs as a command) must be in tools/flag_docs.py's SECTIONS."""
    tools = {f"python -m tools.{os.path.basename(path)[:-3]}"
             for path in glob.glob(os.path.join(REPO, "tools", "*.py"))
             if 'if __name__ == "__main__":' in read(path)}
    listed = {command.line for command in COMMANDS}
    assert tools | {"python step1/train.py", "python step2/train.py", "python evaluate.py"} == listed


def test_flag_tables_are_what_the_parsers_give():
    # A fresh process: plugins registered by other test files would change the --arch help here.
    env = {key: value for key, value in os.environ.items() if key not in ("BNN_PLUGINS", "LCE_ENV")}
    result = subprocess.run([sys.executable, "-m", "tools.flag_docs", "--check"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_script_variables_are_documented():
    page = read(FLAGS_PAGE)
    for script in ("step1/run.sh", "step2/run.sh", "utils/launch.sh", "demo.sh", "tools/measure_gpu.sh"):
        text = read(os.path.join(REPO, script))
        # Read directly (${NAME-default}) or by name in a loop over variables (launch.sh's checks).
        looped = " ".join(re.findall(r"^\s*for name in ([A-Z0-9_ \\\n]+?); do", text, flags=re.M))
        variables = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?-", text)) | set(re.findall(r"[A-Z][A-Z0-9_]+", looped))
        assert variables, script
        missing = {name for name in variables if f"`{name}`" not in page}
        assert not missing, f"{script} reads {sorted(missing)}, which docs/flags.md does not document"


def test_readme_is_a_front_page_with_contents():
    text = read(README)
    assert len(text.splitlines()) <= MAX_README_LINES
    contents = text.split("**Contents**", 1)[1].split("\n## ", 1)[0]
    targets = re.findall(r"\]\(#([^)]+)\)", contents)
    headings = anchors(text)
    assert set(targets) <= headings, f"contents links without a heading: {set(targets) - headings}"
    sections = {anchor(h) for h in re.findall(r"^## (.+)$", without_code(text), flags=re.M)}
    assert sections <= set(targets), f"sections missing from the contents: {sections - set(targets)}"


def test_docs_pages_exist_and_the_readme_links_them():
    pages = glob.glob(os.path.join(DOCS, "*.md"))
    assert len(pages) >= MIN_DOCS_PAGES
    linked = {os.path.normpath(os.path.join(REPO, target.split("#")[0]))
              for target in LINK.findall(without_code(read(README)))}
    assert set(map(os.path.normpath, pages)) <= linked, "a docs/ page the README does not link"


def test_every_relative_link_reaches_its_file_and_heading():
    for path in [README, *glob.glob(os.path.join(DOCS, "*.md"))]:
        for target in LINK.findall(without_code(read(path))):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, fragment = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            where = f"{os.path.relpath(path, REPO)} links {target}"
            assert os.path.exists(linked), where
            if fragment:
                assert fragment in anchors(read(linked)), f"{where}: no such heading"


def test_readme_test_commands_are_what_ci_runs():
    ci = [line for line in read(os.path.join(REPO, ".ci", "run")).splitlines() if line.startswith("python")]
    readme = [line.split("  #")[0].strip() for line in read(README).splitlines()]
    assert ci and all(command in readme for command in ci), ci
    assert sorted(ci, key=readme.index) == ci, "the README gives CI's commands in another order"
