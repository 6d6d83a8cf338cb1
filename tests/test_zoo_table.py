"""benchmarks/zoo_table.py: the docs' zoo tables, flips and counts, from JSON rows alone."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import zoo_table


def row(model, loss, truth, verdict, ratio=1.0, **extra):
    return {"set": "zoo", "model": model, "loss": loss, "truth": truth, "verdict": verdict, "ratio": ratio, **extra}


@pytest.fixture
def runs(tmp_path):
    small = [
        row("good", "default", "trains", "healthy", first="a", last="b"),
        row("good", "natural", "trains", "healthy"),
        row("bad", "default", "fails", "vanishing", 0.001, cause="saturation"),
        row("bad", "natural", "fails", "healthy", 0.5),  # missed
    ]
    large = [
        row("good", "default", "trains", "exploding", 80.0),  # a false alarm, and a flip
        row("good", "natural", "trains", "error"),
        row("bad", "default", "fails", "vanishing", 0.002),
        row("bad", "natural", "fails", "healthy", 0.4),
    ]
    paths = []
    for name, rows in (("small", small), ("large", large)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(f"{name}={path}")
    return paths


def test_tables_mark_wrong_verdicts_and_count_them(runs, capsys):
    assert zoo_table.main(runs) == 0
    out = capsys.readouterr().out
    assert "| good | trains | healthy 1 | healthy 1 | exploding 80 ✗ | error |" in out
    assert "| bad | fails | vanishing 0.001 | healthy 0.5 ✗ | vanishing 0.002 | healthy 0.4 ✗ |" in out
    assert "| zoo | small | 2 | 4 | 3 | 0 | 1 | 0 |" in out
    assert "| zoo | large | 2 | 4 | 1 | 1 | 1 | 1 |" in out


def test_a_verdict_that_changes_between_runs_is_listed_and_errors_are_not_flips(runs, capsys):
    zoo_table.main(runs)
    out = capsys.readouterr().out
    assert "Verdicts that change between runs: 1" in out
    assert "- zoo good (default): small healthy, large exploding" in out


def test_an_argument_without_a_label_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        zoo_table.main([str(tmp_path / "rows.jsonl")])
    assert exit_info.value.code == 2
