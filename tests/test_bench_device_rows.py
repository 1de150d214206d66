"""benchmarks/device_rows.py: the parts that decide what a device run records, without running a benchmark.

The whole script's CPU path (``--smoke``) takes minutes of imports on a 2-core machine, so it is run by
hand (docs/benchmarks.md, "Device rows"); here: table parsing, that every step's flags exist in its benchmark, and that a step past its
timeout is killed with its children and recorded as timed out.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_rows", ROOT / "benchmarks" / "device_rows.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_rows"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


rows = _load()


def test_tables_keeps_rows_drops_separators_and_splits_on_gaps() -> None:
    out = (
        "device cuda (NVIDIA H200), n=4096\n"
        "precision | bare img/s | pipeline img/s | pipeline/bare\n"
        "fp32      |     8619.0 |         1098.0 | 0.13\n"
        "\n"
        "| grad cache | loss |\n|---|---:|\n| off | 7.056303 |\n"
        "Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]\n"
        "Writing model shards: 100%|##########| 1/1 [00:00<00:00, 198.54it/s]\n"
        "ST IR evaluator   0.213   235   4.77x   9.5e-09 max |d|\n"
    )
    assert rows.tables(out) == [
        [
            ["precision", "bare img/s", "pipeline img/s", "pipeline/bare"],
            ["fp32", "8619.0", "1098.0", "0.13"],
        ],
        [["grad cache", "loss"], ["off", "7.056303"]],
    ]


class _Parsed(Exception):
    pass


def _bench(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{script[:-3]}", ROOT / "benchmarks" / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_planned_step_passes_its_benchmarks_own_argument_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A flag the bench does not have would fail the step on the device, where time is scarce: parse each
    # step's arguments (full and smoke) with the bench's own parser, stopping right after the parse.
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        original(self, args, namespace)  # SystemExit(2) on an unknown flag or a bad value
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    steps = rows.plan(False, 16, dict(os.environ)) + rows.plan(True, 2, dict(os.environ))
    names = {step.name for step in steps}
    assert {
        "embed_gpu_vit-b16_bf16",
        "embed_gpu_efficientnet_fp32",
        "gpu_step",
        "embed_cpu16_vit-b16",
    } <= names
    for step in steps:
        script, *args = step.args
        module = _bench(script)
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(_Parsed):
            module.main()


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "slow.py"
    script.write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    step = rows.Step("slow", [str(script)], timeout_s=60)  # an absolute path replaces benchmarks/
    log = io.StringIO()
    tic = time.perf_counter()
    record = rows.run_step(step, dict(os.environ), timeout_s=2.0, log=log)
    assert time.perf_counter() - tic < 20
    assert record["timed_out"] is True and record["rc"] != 0
    assert record["output"] == "started\n"
    assert "TIMED OUT" in log.getvalue()
    child = int(pid_file.read_text())
    for _ in range(50):  # the killed child is reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        stat = Path(f"/proc/{child}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            break  # a zombie: dead, not yet reaped
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} of the timed-out step still runs")


def test_last_json_line_becomes_the_step_result(tmp_path: Path) -> None:
    script = tmp_path / "ok.py"
    script.write_text('print("a | b | c")\nprint("1 | 2 | 3")\nprint(\'{"samples_per_s": 12.5}\')\n')
    record = rows.run_step(rows.Step("ok", [str(script)], 30), dict(os.environ), 30, io.StringIO())
    assert record["rc"] == 0 and record["timed_out"] is False
    assert record["result"] == {"samples_per_s": 12.5}
    assert record["tables"] == [[["a", "b", "c"], ["1", "2", "3"]]]
