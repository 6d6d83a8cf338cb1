"""Every code block of README.md and docs/ runs here, so that a stale sample fails the suite.

How a block is treated; a ``<!-- docs-test: ... -->`` comment on the line right above its
fence changes that:

- ```` ```python ````: run with ``exec`` in one namespace per page, in page order (a later
  block may use what an earlier one defined), with ``my_project`` (below) importable. A block
  that defines a test using the ``gradient_health`` fixture runs through pytester instead,
  and its tests must pass.
- ``pytest [name=test_x.py] [args="..."]... [passed=N failed=N xfailed=N ...]``: the block
  is a test module, run by pytester in-process; each ``args=`` is one run, in order, in one
  folder, and every run must end with the outcome given (without one: every test passes),
  or with its own ``expect="passed=N ..."``, one per ``args=``.
- ``file=PATH``: the block is written to PATH in the folder of every later run of its page
  (a conftest.py, a pyproject.toml); it runs as part of those.
- ``output [file=PATH]``: the block is what the previous run of its page printed (or wrote
  to PATH). A line ``...`` stands for any number of lines.
- ```` ```console ```` with output lines: its ``$`` commands run in bash, in a folder that
  holds a copy of examples/, my_project.py and the page's files, and each is compared with
  the lines that follow it. A block of commands alone (```` ```bash ````, or ```` ```console ````
  without output) is an instruction and does not run.
- ``skip REASON``: not run; rare, and never without a reason.

Compared output may differ from the sample only where a machine's rounding shows: runs of
spaces (table columns) and the last printed digit of a decimal number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_LIMIT = 12_000

# The reader's own code, which the examples import as `from my_project import ...`.
MY_PROJECT = '''\
"""Stands in for the reader's own package in the examples of README.md and docs/."""

import torch
from torch import nn


class MyModel(nn.Module):
    """The README's example with its fix: ReLU instead of sigmoid after each of four layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = fc(x).relu()
        return x


class TextClassifier(nn.Module):
    """Token ids and an attention mask in, two logits out."""

    vocab_size = 1000

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(self.vocab_size, 64)
        self.hidden = nn.Linear(64, 64)
        self.head = nn.Linear(64, 2)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.hidden(pooled).relu())
'''

# -- reading the pages ---------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)[^`]*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<words>.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    directive: dict[str, list[str]]

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def has(self, word: str) -> bool:
        return word in self.directive


def parse_directive(words: str) -> dict[str, list[str]]:
    """'pytest args="-k x" failed=1' -> {'pytest': [], 'args': ['-k x'], 'failed': ['1']}."""
    if words.startswith("skip"):
        return {"skip": [words[4:].strip()]}
    parsed: dict[str, list[str]] = {}
    for token in shlex.split(words):
        key, _, value = token.partition("=")
        parsed.setdefault(key, [])
        if "=" in token:
            parsed[key].append(value)
    return parsed


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, end = [], index + 1
        while end < len(lines) and not re.match(rf"^ {{0,{indent + 3}}}{fence[0]}{{{len(fence)},}}\s*$", lines[end]):
            body.append(lines[end][indent:] if lines[end][:indent].strip() == "" else lines[end])
            end += 1
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        found = DIRECTIVE.match(lines[before]) if before >= 0 else None
        directive = parse_directive(found["words"]) if found else {}
        blocks.append(Block(page, index + 1, opening["lang"].lower(), "\n".join(body) + "\n", directive))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def is_fixture_test(block: Block) -> bool:
    return bool(re.search(r"^def test_\w+\(.*gradient_health", block.text, re.M))


def kind_of(block: Block) -> str:
    """What the harness does with a block: pytest, exec, file, output, console, skip or show."""
    if block.has("skip"):
        return "skip"
    if block.has("output"):
        return "output"
    if block.has("file") and not block.has("pytest"):
        return "file"
    if block.has("pytest") or (block.lang == "python" and is_fixture_test(block)):
        return "pytest"
    if block.lang in ("python", "py"):
        return "exec"
    if block.lang == "console" and any(line and not line.startswith("$ ") for line in block.text.splitlines()):
        return "console"
    return "show"


# -- comparing output ----------------------------------------------------------------

# A decimal number on its own: not part of a name (fc1, blocks.6.1), perhaps followed by x or %.
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?=[x%]?(?:[^\w.]|\.(?!\d)|$))")


def _last_digit(text: str) -> float:
    """One unit in the last printed digit of a decimal number ('0.00596' -> 1e-05)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def lines_match(documented: str, real: str) -> bool:
    if documented.rstrip() == real.rstrip():
        return True
    squeeze = " ".join
    doc_parts, real_parts = NUMBER.split(documented), NUMBER.split(real)
    doc_numbers, real_numbers = NUMBER.findall(documented), NUMBER.findall(real)
    if len(doc_parts) != len(real_parts):
        return False
    if any(squeeze(a.split()) != squeeze(b.split()) for a, b in zip(doc_parts, real_parts)):
        return False
    for doc, now in zip(doc_numbers, real_numbers):
        if doc == now:
            continue
        if "." not in doc and "e" not in doc.lower():  # a count: exact
            return False
        if abs(float(doc) - float(now)) > _last_digit(doc) * 1.0001:
            return False
    return True


def output_matches(documented: str, real: str) -> bool:
    """Whether ``real`` has the documented lines, '...' standing for any number of lines."""
    want = documented.rstrip("\n").splitlines()
    have = [line.rstrip() for line in real.rstrip("\n").splitlines()]

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(have) + 1))
        return j < len(have) and lines_match(want[i], have[j]) and match(i + 1, j + 1)

    return match(0, 0)


def assert_output(block: Block, real: str) -> None:
    if not output_matches(block.text, real):
        raise AssertionError(
            f"the sample at {block.where} is not what runs today.\n--- documented ---\n{block.text}--- real ---\n{real}"
        )


def test_the_comparison_is_strict_about_words_and_loose_only_about_last_digits():
    assert output_matches("ratio 0.00596 (fc1 / fc4)", "ratio 0.00597  (fc1 / fc4)")
    assert not output_matches("ratio 0.00596 (fc1 / fc4)", "ratio 0.00598 (fc1 / fc4)")
    assert not output_matches("3 sigmoid call(s)", "4 sigmoid call(s)")
    assert not output_matches("blocks.6.1 Linear", "blocks.6.2 Linear")
    assert not output_matches("verdict: vanishing", "verdict: healthy")
    assert output_matches("first\n...\nlast", "first\na\nb\nlast")
    assert not output_matches("first\nlast", "first\na\nlast")


# -- where the runs happen -----------------------------------------------------------


def page_files(block: Block) -> dict[str, str]:
    """The page's ``file=`` blocks above ``block``, later ones replacing earlier ones."""
    files = {"my_project.py": MY_PROJECT}
    for other in ALL_BLOCKS:
        if other.page == block.page and other.line < block.line and kind_of(other) == "file":
            files[other.directive["file"][0]] = other.text
    return files


def output_after(block: Block) -> list[Block]:
    """The ``output`` blocks that follow ``block`` before the page's next run."""
    shown, after = [], False
    for other in ALL_BLOCKS:
        if other.page != block.page:
            continue
        if other is block:
            after = True
        elif after and kind_of(other) == "output":
            shown.append(other)
        elif after and kind_of(other) in ("pytest", "exec", "console"):
            break
    return shown


def ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


PYTEST_BLOCKS = [block for block in ALL_BLOCKS if kind_of(block) == "pytest"]
CONSOLE_BLOCKS = [block for block in ALL_BLOCKS if kind_of(block) == "console"]
EXEC_PAGES = sorted({block.page for block in ALL_BLOCKS if kind_of(block) == "exec"})
OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")


def _first(value: str | list[str]) -> str:
    return value[0] if isinstance(value, list) else value


@pytest.fixture
def quiet_env(monkeypatch):
    """pytest's output as a reader sees it in a terminal 80 wide, not as CI or xdist shape it."""
    for name in list(os.environ):
        if name in ("CI", "BUILD_NUMBER", "PYTEST_ADDOPTS") or name.startswith("PYTEST_XDIST"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "80")


@pytest.mark.parametrize("block", PYTEST_BLOCKS, ids=ids(PYTEST_BLOCKS))
def test_pytest_block(block: Block, pytester: pytest.Pytester, quiet_env):
    for path, text in page_files(block).items():
        pytester.path.joinpath(path).parent.mkdir(parents=True, exist_ok=True)
        pytester.path.joinpath(path).write_text(text)
    name = block.directive.get("name", ["test_example.py"])[0]
    pytester.path.joinpath(name).write_text(block.text)
    runs = block.directive.get("args", [""])
    expectations = block.directive.get("expect", [])
    assert len(expectations) in (0, len(runs)), f"{block.where}: give one expect= per args=, or none"
    result = None
    for number, args in enumerate(runs):
        result = pytester.runpytest("-p", "no:cacheprovider", *shlex.split(args))
        output = result.stdout.str()
        words = dict(word.split("=") for word in expectations[number].split()) if expectations else block.directive
        expected = {key: int(_first(words[key])) for key in OUTCOMES if key in words}
        if expected:
            outcomes = result.parseoutcomes()
            got = {key: outcomes.get(key, outcomes.get(key.rstrip("s"), 0)) for key in OUTCOMES}
            want = {key: expected.get(key, 0) for key in OUTCOMES}
            assert got == want, f"{block.where} (pytest {args}) ran {got}, the page says {want}\n{output}"
        else:
            assert result.ret == 0, f"{block.where} (pytest {args}) failed; the page says its tests pass\n{output}"
    assert result is not None
    for shown in output_after(block):
        written = shown.directive.get("file")
        assert_output(shown, pytester.path.joinpath(written[0]).read_text() if written else result.stdout.str())


@pytest.mark.parametrize("page", EXEC_PAGES, ids=[str(page.relative_to(ROOT)) for page in EXEC_PAGES])
def test_python_blocks(page: Path, tmp_path, monkeypatch):
    tmp_path.joinpath("my_project.py").write_text(MY_PROJECT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_project", raising=False)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    import torch  # a block may seed torch's global RNG: the tests after this one must not see it

    for block in [block for block in ALL_BLOCKS if block.page == page and kind_of(block) == "exec"]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), torch.random.fork_rng(devices=[]):
            try:
                exec(compile(block.text, block.where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"the Python block at {block.where} raised {error!r}") from error
        for shown in output_after(block):
            assert_output(shown, printed.getvalue())
    sys.modules.pop("my_project", None)


def _console_commands(text: str) -> list[tuple[str, list[str]]]:
    """[(command, the lines printed after it)] of a console block."""
    commands: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:].split("  #", 1)[0].strip(), []))
        elif commands:
            commands[-1][1].append(line)
    return commands


@pytest.mark.slow
@pytest.mark.parametrize("block", CONSOLE_BLOCKS, ids=ids(CONSOLE_BLOCKS))
def test_console_block(block: Block, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    for path, text in page_files(block).items():
        tmp_path.joinpath(path).parent.mkdir(parents=True, exist_ok=True)
        tmp_path.joinpath(path).write_text(text)
    commands = _console_commands(block.text)
    marker = "@@docs-test-next-command@@"
    # One shell for the block, so that `echo $?` sees the status of the command before it.
    script = "".join(
        f"{{ {command}\n}} 2>&1\n__status=$?; echo {marker}; (exit $__status)\n" for command, _ in commands
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("CI", "BUILD_NUMBER", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")
        and not key.startswith("PYTEST_XDIST")
    }
    env.update(COLUMNS="80", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    printed = done.stdout.split(marker + "\n")
    for (command, documented), real in zip(commands, printed):
        sample = dataclasses.replace(block, text="\n".join(documented) + "\n")
        if not output_matches(sample.text, real):
            raise AssertionError(
                f"`{command}` at {block.where} prints something else today.\n--- documented ---\n{sample.text}"
                f"--- real ---\n{real}"
            )


# -- what the pages must hold ----------------------------------------------------------


def test_every_block_is_accounted_for():
    """Every Python block runs; file blocks feed a later run; outputs follow a run; skips say why."""
    for block in ALL_BLOCKS:
        kind = kind_of(block)
        if block.lang in ("python", "py"):
            assert kind in ("pytest", "exec", "file", "skip"), f"the Python block at {block.where} does not run"
        if kind == "skip":
            assert block.directive["skip"][0], f"the skipped block at {block.where} says no reason"
        if kind == "file":
            later = [b for b in ALL_BLOCKS if b.page == block.page and b.line > block.line]
            assert any(kind_of(b) in ("pytest", "console") for b in later), f"nothing runs {block.where}'s file"
        if kind == "output":
            earlier = [b for b in ALL_BLOCKS if b.page == block.page and b.line < block.line]
            assert any(kind_of(b) in ("pytest", "exec") for b in earlier), f"no run before the output at {block.where}"
    skipped = [block.where for block in ALL_BLOCKS if kind_of(block) == "skip"]
    assert len(skipped) <= 3, f"keep blocks that do not run rare: {skipped}"


def test_readme_fits_in_its_budget():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


def test_the_quick_start_is_two_one_line_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = next(b for b in blocks_of(ROOT / "README.md") if b.text.strip() and b.text.strip() in section)
    first, second = block.text.strip().splitlines()
    venv = "python3 -m venv .venv && . .venv/bin/activate && pip install torch=="
    assert first.startswith(venv) and '-e ".[plot]"' in first and first.endswith("&& pytest examples --grad-report")
    assert second.startswith(venv) and '-e ".[test]"' in second and second.endswith("&& pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    pin = re.search(r"torch==[\d.]+", ci)
    assert pin and pin[0] in first and pin[0] in second, "README pins the torch CI installs"
    assert re.search(r"^pytest$", ci, re.M), ".ci/run runs the README's test command, bare `pytest`"


def test_the_configuration_table_has_every_bound_with_its_spellings_and_default():
    from pytest_gradcheck.core.bounds import BOUND_OPTIONS, Bounds

    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in readme.splitlines() if line.startswith("| `")}
    defaults = Bounds()
    for name, flag, _ in BOUND_OPTIONS:
        row = rows.get(f"`{name}`")
        assert row, f"README's configuration table has no row for {name}"
        assert f"`grad_{name}`" in row and f"`{flag}`" in row, f"{name}: the ini key or flag is not {flag}"
        default = getattr(defaults, name)
        shown = "off" if default is None else "false" if default is False else default
        cells = [cell.strip().strip("`") for cell in row.split("|")]
        assert any(_same_default(cell, shown) for cell in cells), f"{name}: README's default is not {shown}"


def _same_default(cell: str, default: object) -> bool:
    if isinstance(default, str):
        return cell.split()[0] == default if cell.split() else False
    powers = {"2^-24": 2.0**-24, "2^24": 2.0**24}
    try:
        value = powers.get(cell.split()[0]) or float(cell.split()[0])
    except (ValueError, IndexError):
        return False
    return value == default


def test_the_docs_site_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in config, f"{page} is not in mkdocs.yml's nav"


def test_the_json_schema_page_names_every_key_the_report_writes():
    from pytest_gradcheck.core.bounds import Bounds
    from pytest_gradcheck.core.findings import CheckResult, Finding
    from pytest_gradcheck.core.profile import ActivationProfile, GradientProfile, LayerStats, TimeProfile
    from pytest_gradcheck.report.json_report import json_document

    layer = LayerStats("fc1", "Linear", 4160, 0.1)
    profile = GradientProfile("Net", [layer], 1.0, time=[TimeProfile("rnn", "RNN", [0.1, 1.0])])
    profile.activations = ActivationProfile()
    finding = Finding("vanishing", ["fc1"], "...", True)
    document = json_document([CheckResult("t.py::test", None, profile, Bounds(), [finding])])
    keys = set(document) | set(document["results"][0]) | set(document["results"][0]["profile"])
    keys |= set(document["results"][0]["profile"]["layers"][0]) | set(document["results"][0]["findings"][0])
    keys |= set(document["results"][0]["bounds"]) | set(document["results"][0]["profile"]["time"][0])
    page = (ROOT / "docs" / "reports.md").read_text()
    missing = sorted(key for key in keys if f"`{key}`" not in page)
    assert not missing, f"docs/reports.md does not describe these JSON keys: {missing}"


def test_toml_and_json_blocks_parse():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    for block in ALL_BLOCKS:
        if block.lang == "toml":
            tomllib.loads(block.text)
        if block.lang == "json" and not block.has("skip"):
            json.loads(block.text)
