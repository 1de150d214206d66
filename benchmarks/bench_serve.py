"""Load test of ``cliptune serve`` on the loopback address: concurrent clients, text then image queries.

A synthetic fashion catalogue (``cliptune data synth fashion``) is indexed with the embedded default
model; ``python -m cliptune serve`` runs in its own process (as users start it) on a free loopback port,
and ``--clients`` threads, each with its own HTTP connection, send queries back to back for ``--seconds``
per phase: first text queries, then uploaded query images. Every query is new to the server's feature
cache (a counter in each text; a counter appended after each PNG's end, which decoders ignore but the
cache's byte hash does not), so each request pays a real model forward. Reported per phase: requests,
throughput, p50 / p99 latency as the client sees it, and errors (anything but a 200), which must be 0.

Usage:
    python benchmarks/bench_serve.py --n 300 --clients 20 --seconds 30
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_model
from cliptune.search import build_index

COLOURS = ["red", "blue", "black", "white", "green", "grey", "pink", "yellow"]
GARMENTS = ["jeans", "t-shirt", "dress", "jacket", "skirt", "shorts", "sweater", "coat"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(base: str, server: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"cliptune serve exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("cliptune serve did not answer /healthz in time")


def _phase(
    base: str, clients: int, seconds: float, make_request: Callable[[httpx.Client, int], httpx.Response]
) -> dict[str, float]:
    counter = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as http:
            while time.monotonic() < stop:
                i = next(counter)
                t0 = time.perf_counter()
                try:
                    response = make_request(http, i)
                    ok = response.status_code == 200
                    why = f"{response.status_code} {response.text[:100]}"
                except httpx.HTTPError as exc:
                    ok, why = False, repr(exc)
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    if not ok:
                        errors.append(why)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr)
    return {
        "requests": len(ms),
        "per_s": len(ms) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "errors": len(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="catalogue photos")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        catalogue = render_fashion(root / "fashion", n=args.n, seed=0)
        build_index(
            load_model("embedded"),
            read_catalogue(catalogue),
            root / "idx",
            cache_dir=root / "cache",
            progress=False,
        )
        images = [p.read_bytes() for p in sorted((catalogue / "images").glob("*.png"))]
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "cliptune", "serve", str(root / "idx"), "--port", str(port)],
            env=os.environ.copy(),
        )
        try:
            _wait_healthy(base, server)

            def text(http: httpx.Client, i: int) -> httpx.Response:
                query = f"{COLOURS[i % 8]} {GARMENTS[(i // 8) % 8]} no. {i}"  # new to the cache every time
                return http.post("/search", json={"text": query, "k": args.k})

            def image(http: httpx.Client, i: int) -> httpx.Response:
                data = images[i % len(images)] + i.to_bytes(8, "little")  # bytes after IEND: a new hash
                return http.post(
                    "/search", files={"image": ("q.png", data, "image/png")}, data={"k": str(args.k)}
                )

            rows = {
                "text": _phase(base, args.clients, args.seconds, text),
                "image upload": _phase(base, args.clients, args.seconds, image),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)
    load = os.getloadavg()
    print(
        f"\n{args.clients} clients, {args.seconds:g} s per phase, {args.n}-image index, k={args.k}, "
        f"{os.cpu_count()} CPUs, load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
    )
    print("| queries | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        print(
            f"| {name} | {r['requests']:.0f} | {r['per_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | {r['errors']:.0f} |"
        )


if __name__ == "__main__":
    main()
