"""The speed scripts in bench/ keep running where there is no GPU: each at toy sizes on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_throughput_runs_tiny_on_the_cpu():
    rows = _load("gpu_throughput").main(["--tiny", "--epochs", "3", "--only", "resnet18"])
    (row,) = rows
    assert row["device"] == "cpu" and row["trainer"] > 0 and row["bare_eager"] > 0
    assert row["ratio_vs_bare_eager"] == pytest.approx(row["trainer"] / row["bare_eager"])


def test_gpu_throughput_refuses_too_few_epochs():
    with pytest.raises(SystemExit):
        _load("gpu_throughput").main(["--tiny", "--epochs", "2"])
