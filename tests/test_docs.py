"""The documentation holds together: every relative link and #anchor in README.md and
docs/**/*.md resolves, every page is reachable, each experiment page opens with its
command, and the README stays a front page (at most 250 lines and 16 KB) that keeps its
two quick-start commands byte for byte. No torch, no subprocess: it reads text only."""
import os
import re
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
EXPERIMENTS = os.path.join(DOCS, "experiments")

# The two quick-start commands, exactly as a new user pastes them (written out here, not
# read from git, so that a change to the README cannot move the reference with it).
QUICK_START_TRAIN = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                     "pip install -r requirements.txt && python cnf.py --niters 400 --num_samples 128 --num_timesteps 8 --test_freq 50")
QUICK_START_TEST = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                    "pip install -r requirements.txt && pytest -q")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
# [text](target) and ![alt](target); the text may hold one level of brackets or code
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files():
    files = [README]
    for folder, _, names in os.walk(DOCS):
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".md")]
    return files


def prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    inside = None
    for number, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if m:
            if inside is None:
                inside = m.group(1)
            elif m.group(1) == inside:
                inside = None
            continue
        if inside is None:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading: its text without markup, lowercased, every character
    other than a letter, digit, space, hyphen or underscore dropped, spaces as hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters and digits of any script, and _
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor a markdown file defines, with GitHub's -1, -2, ... for repeated ones."""
    seen, out = {}, set()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for _, line in prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path):
    """(line number, target) of every markdown link and image outside code."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in prose_lines(text):
        line = CODE_SPAN.sub("", line)
        for m in LINK.finditer(line):
            target = m.group(1)
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            yield number, target


def broken_links(path, root=ROOT):
    """One message per link of ``path`` that does not resolve inside ``root``."""
    problems = []
    where = os.path.relpath(path, root)
    for number, target in links(path):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # outside the repository (https:, mailto:, ...)
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part and not anchor:
            problems.append(f"{where}:{number}: empty link target")
            continue
        if file_part.startswith("/"):
            problems.append(f"{where}:{number}: {target}: use a relative link, not an absolute path")
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if os.path.relpath(resolved, root).startswith(os.pardir):
            problems.append(f"{where}:{number}: {target}: points outside the repository")
            continue
        if not os.path.exists(resolved):
            problems.append(f"{where}:{number}: {target}: no such file or folder")
            continue
        if anchor:
            if not resolved.endswith(".md") or not os.path.isfile(resolved):
                problems.append(f"{where}:{number}: {target}: an #anchor needs a markdown file (no #L line anchors)")
            elif unquote(anchor) not in anchors(resolved):
                problems.append(f"{where}:{number}: {target}: no heading with the anchor #{anchor} "
                                f"in {os.path.relpath(resolved, root)}")
    return problems


def _ids(files):
    return [os.path.relpath(p, ROOT) for p in files]


@pytest.mark.parametrize("path", markdown_files(), ids=_ids(markdown_files()))
def test_every_relative_link_and_anchor_resolves(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_link_check_sees_links_and_catches_broken_ones(tmp_path):
    """The check is not vacuous: it finds the README's links, and it reports a missing file,
    a missing anchor and a missing heading in another page."""
    assert len(list(links(README))) >= 10
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A heading, with `code`\n\n## A heading, with `code`\n\n"
                    "[ok](#title) [ok](#a-heading-with-code) [ok](#a-heading-with-code-1)\n"
                    "[bad](#a-heading-with-code-2) [bad](missing.md) [bad](page.md#nowhere)\n"
                    "`[not a link](missing-too.md)`\n\n```\n[not a link](missing-three.md)\n```\n"
                    "[outside](../elsewhere.md)\n",
                    encoding="utf-8")
    problems = broken_links(str(page), root=str(tmp_path))
    assert len(problems) == 4, problems
    assert any("#a-heading-with-code-2" in p for p in problems)
    assert any("outside the repository" in p for p in problems)
    assert any("missing.md" in p for p in problems)
    assert any("#nowhere" in p for p in problems)


@pytest.mark.parametrize("heading, anchor", [
    ("Results so far", "results-so-far"),
    ("The grid watch: `val_loss_fine`, `grid_gap`", "the-grid-watch-val_loss_fine-grid_gap"),
    ("CPU: one training iteration", "cpu-one-training-iteration"),
    ("The float16 adjoint over e^-30", "the-float16-adjoint-over-e-30"),
    ("See [the CLI](cli.md) — flags", "see-the-cli--flags"),
    ("Zeichen für Zeichen", "zeichen-für-zeichen"),
])
def test_anchor_rules_are_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_readme_is_a_front_page():
    with open(README, "rb") as f:
        raw = f.read()
    lines = raw.decode("utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; at most 250 (move the detail to docs/)"
    assert len(raw) <= 16 * 1024, f"README.md has {len(raw)} bytes; at most 16 KB (move the detail to docs/)"


@pytest.mark.parametrize("command", [QUICK_START_TRAIN, QUICK_START_TEST], ids=["train", "test"])
def test_readme_keeps_the_quick_start_commands(command):
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert f"```bash\n{command}\n```" in text, f"the quick-start command is missing or changed:\n{command}"


def test_every_docs_page_is_linked():
    """Each page of docs/ is linked from the README, and each experiment page from the
    experiments index, so none is an orphan."""
    def targets(path):
        base = os.path.dirname(path)
        return {os.path.normpath(os.path.join(base, unquote(t.partition("#")[0])))
                for _, t in links(path) if not SCHEME.match(t) and t.partition("#")[0]}

    from_readme = targets(README)
    index = os.path.join(EXPERIMENTS, "README.md")
    from_index = targets(index)
    missing = []
    for path in markdown_files()[1:]:
        # an experiment page, or a sweep's summary.md committed beside it: linked from the index
        linked = from_index if os.path.dirname(path).startswith(EXPERIMENTS) and path != index else from_readme
        if path not in linked:
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, "pages nobody links to: " + ", ".join(missing)


def experiment_pages():
    return sorted(os.path.join(EXPERIMENTS, n) for n in os.listdir(EXPERIMENTS)
                  if n.endswith(".md") and n != "README.md")


def test_there_are_experiment_pages():
    assert len(experiment_pages()) >= 5


@pytest.mark.parametrize("path", experiment_pages(), ids=_ids(experiment_pages()))
def test_an_experiment_page_is_dated_and_opens_with_its_command(path):
    """docs/experiments/YYYY-MM-DD-short-name.md, a title, then at once a bash block."""
    name = os.path.basename(path)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9]+(-[a-z0-9]+)*\.md", name), name
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    assert lines[0].startswith("# "), f"{name}: the first line is its title"
    assert lines[1].strip() == "```bash", f"{name}: the title is followed by its command in a ```bash block"
    assert lines[2].strip() and not lines[2].startswith("```"), f"{name}: the command block is empty"


ENTRY_POINTS = ("cnf.py", "summarize.py", "bench.py", "plots.py", "metrics.py", "density.py", "tools/kernel_sweep.py",
                "tools/warm_kernels.py", "tools/kernel_report.py", "tools/run_report.py")


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_entry_points_document_their_public_functions(path):
    """Every entry point opens with a docstring, and so does each of its public functions and
    classes (a newcomer reads these first)."""
    import ast

    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    assert ast.get_docstring(tree), f"{path} has no module docstring"
    bare = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and not n.name.startswith("_") and not ast.get_docstring(n)]
    assert not bare, f"{path}: public functions without a docstring: {bare}"


def test_the_longest_first_order_names_test_files_that_exist():
    """tests/conftest.py hands these files to the workers first; a renamed one would drop out silently."""
    from conftest import SLOW_FILES

    assert not [f for f in SLOW_FILES if not os.path.isfile(os.path.join(ROOT, f))]
    assert len(set(SLOW_FILES)) == len(SLOW_FILES)
