"""Time budgets and incremental results of ``python -m personamoe bench`` (fast, CPU, fake cases)."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import pytest

from personamoe.bench import cli
from personamoe.bench.runner import Result, paired_ratio, ratio_table, time_interleaved


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_provider_slower_than_its_budget_in_one_call_is_skipped_with_a_note():
    fns: dict[str, Callable[[], object]] = {"base": lambda: None, "slow": lambda: time.sleep(0.2)}
    rs = time_interleaved("C", fns, repeats=5, warmup=1, budget=0.05)
    assert len(rs["base"].samples) == 5
    assert rs["slow"].samples == []
    note = rs["slow"].note
    assert note.startswith("skipped: one call took ") and note.endswith(" s > budget 0.05 s")
    table = ratio_table(list(rs.values()))
    assert "| C | slow | - | - | - | - | - | skipped: one call took" in table
    assert math.isnan(paired_ratio(rs["slow"], rs["base"]))


def test_provider_whose_calls_add_up_past_its_budget_keeps_its_samples():
    fns: dict[str, Callable[[], object]] = {
        "base": lambda: None,
        "slowish": lambda: time.sleep(0.02),
    }
    rs = time_interleaved("C", fns, repeats=50, warmup=0, budget=0.1)
    n = len(rs["slowish"].samples)
    assert 1 <= n < 50 and len(rs["base"].samples) == 50
    assert rs["slowish"].note == f"budget 0.1 s ran out after {n}/50 rounds"
    assert paired_ratio(rs["slowish"], rs["base"]) > 1  # paired over the rounds both have
    assert "ran out after" in ratio_table(list(rs.values()))


def test_deadline_stops_every_provider():
    fns: dict[str, Callable[[], object]] = {"a": lambda: time.sleep(0.01), "b": lambda: None}
    rs = time_interleaved("C", fns, repeats=1000, warmup=0, deadline=time.perf_counter() + 0.1)
    assert 1 <= len(rs["a"].samples) < 1000
    assert "run time budget ran out" in rs["a"].note


def test_budget_options_parse_with_defaults_by_mode():
    assert cli.budgets(_parse()) == cli.QUICK_BUDGETS
    assert cli.budgets(_parse("--full")) == cli.FULL_BUDGETS
    args = _parse("--provider-budget", "5", "--time-budget", "30")
    assert (args.provider_budget, args.time_budget) == (5.0, 30.0)
    assert cli.budgets(args) == (5.0, 30.0)
    assert cli.budgets(_parse("--provider-budget", "0", "--time-budget", "0")) == (
        math.inf,
        math.inf,
    )
    with pytest.raises(SystemExit):
        cli.budgets(_parse("--time-budget", "-1"))
    with pytest.raises(SystemExit):
        _parse("--provider-budget", "soon")


@pytest.fixture
def fake_bench(monkeypatch):
    """cli.main without measuring: no machine probe, no plot; cases from ``calls``."""
    monkeypatch.setattr(cli, "machine_info", lambda: {"cores": 1})
    monkeypatch.setattr(cli, "describe_machine", lambda info: "fake")
    monkeypatch.setattr(cli, "plot", lambda results, path: False)
    seen: list[tuple[str, float | None, float | None]] = []

    def run_layer_case(name, args, dtype, budget=None, deadline=None):
        seen.append((name, budget, deadline))
        if name == "L16":
            raise RuntimeError("case 2 failed")
        if name == "L1":
            time.sleep(0.2)
        return [Result(name, "base", [1.0, 1.0]), Result(name, "personamoe", [1.1, 1.2])]

    monkeypatch.setattr(cli, "run_layer_case", run_layer_case)
    return seen


def test_results_json_holds_finished_cases_when_a_later_case_fails(tmp_path, fake_bench, capsys):
    args = _parse("--cases", "L1,L16", "--out", str(tmp_path), "--provider-budget", "7")
    with pytest.raises(RuntimeError, match="case 2 failed"):
        cli.main(args)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["complete"] is False
    assert {r["case"] for r in payload["results"]} == {"L1"}
    assert payload["provider_budget_s"] == 7.0
    assert "| L1 | personamoe |" in capsys.readouterr().out  # the table so far
    assert [name for name, _, _ in fake_bench] == ["L1", "L16"]
    assert fake_bench[0][1] == 7.0 and fake_bench[0][2] is not None
    assert not list(tmp_path.glob(".*.tmp"))


def test_cases_left_after_the_time_budget_are_skipped_with_a_note(tmp_path, fake_bench, capsys):
    args = _parse("--cases", "L1,L256", "--out", str(tmp_path), "--time-budget", "0.1")
    assert cli.main(args) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["complete"] is True
    skipped = [r for r in payload["results"] if r["case"] == "L256"]
    assert len(skipped) == 1 and skipped[0]["note"] == "skipped: run time budget 0.1 s spent"
    assert "| L256 | - | - |" in capsys.readouterr().out
    assert [name for name, _, _ in fake_bench] == ["L1"]
