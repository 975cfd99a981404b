"""pytest set-up of the benchmark suite: the one machine description (``personamoe.bench.runner``)
in the run's header when benchmarking for real, and in pytest-benchmark's saved results."""

from __future__ import annotations

from typing import Any

import pytest

from personamoe.bench import runner


def pytest_report_header(config: pytest.Config) -> str | None:
    # Not in smoke runs (pyproject's --benchmark-disable): it imports transformers and peft.
    disabled = config.getoption("benchmark_disable", default=True)
    if disabled and not config.getoption("benchmark_enable", default=False):
        return None
    return f"machine: {runner.describe_machine()}"


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    machine_info["personamoe"] = runner.machine_info()
