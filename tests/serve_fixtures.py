"""A tiny served index and a live loopback server, shared by the `cliptune serve` tests.

`served_index` builds what `cliptune serve` is pointed at in real use, in miniature: a synthetic fashion
catalogue (24 photos), a run directory whose `model/` is a tiny random CLIP (tests/tiny_models.py) with
its `eval/test.json` and a suite verdict, an index built with that model, and a small suite YAML for the
catalogue. `live_server` runs an ASGI app under uvicorn on a free 127.0.0.1 port in a thread, so a real
browser or HTTP client talks to it.

Example:
    >>> served = served_index(tmp_path)
    >>> with live_server(create_app(served.index, suite=served.suite)) as base:
    ...     urllib.request.urlopen(f"{base}/healthz")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import uvicorn

from cliptune.config import Config, save_config
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import load_model
from cliptune.search import build_index
from tests.test_report import eval_json, suite_json, write_json
from tests.tiny_models import make_tiny_clip

__all__ = ["SUITE_YAML", "Served", "live_server", "served_index"]

# Flags are attribute filters, so they hold for any model; the image query is a catalogue item (blue
# dotted t-shirt, images/000017.png of the seed-0 24-photo render), left out of its own ranking.
SUITE_YAML = """\
suite: serve-mini
defaults:
  k: 5
categories:
  garments:
    queries:
      - id: garments-01
        text: a black leather jacket
        relevant: {garment: jacket}
        yellow: {garment: coat}
        red: {garment: [dress, skirt]}
      - id: garments-02
        text: ripped jeans
        relevant: {garment: jeans, rips: true}
        yellow: {garment: shorts}
        red: {garment: [sweater, t-shirt]}
  similar:
    queries:
      - id: similar-01
        image: images/000017.png
        relevant: {garment: t-shirt}
        yellow: {garment: sweater}
        red: {garment: {not: [t-shirt, sweater]}}
"""


@dataclass(frozen=True)
class Served:
    """Paths of a served index: the catalogue, the run whose model built the index, the index, a suite."""

    catalogue: Path
    run: Path
    index: Path
    suite: Path


def served_index(root: Path, *, n: int = 24, captions: dict[str, str] | None = None) -> Served:
    """Render a catalogue, make a run with a tiny model, index the catalogue with it, write a suite.

    Args:
        root: An empty folder; everything is written under it.
        n: Photos in the catalogue.
        captions: file_name -> caption replacing that photo's caption (e.g. hostile text for escaping tests).
    """
    catalogue = render_fashion(root / "fashion", n=n, seed=0, size=128)
    if captions:
        rows = pd.read_csv(catalogue / "metadata.csv", dtype=str, keep_default_na=False)
        for name, text in captions.items():
            rows.loc[rows["file_name"] == name, "text"] = text
        rows.to_csv(catalogue / "metadata.csv", index=False)
    run = root / "run"
    make_tiny_clip(run / "model", seed=0)
    save_config(Config(name="serve-tiny", data={"catalogue": str(catalogue)}), run / "config.yaml")
    files = sorted(p.relative_to(catalogue).as_posix() for p in (catalogue / "images").glob("*.png"))
    ids = [str(i) for i in range(len(files))]
    ranks = [i % 4 + 1 for i in range(len(files))]  # query i's own photo at rank 1..4: MRR 1, 1/2, 1/3, 1/4
    test = eval_json("test", {"t2i": {"ids": ids, "top": [[f] for f in files],
                                      "relevant": [[f] for f in files],
                                      "values": {"mrr": [1 / r for r in ranks],
                                                 "recall@5": [1.0] * len(files)}}},
                     catalogue=catalogue)  # fmt: skip
    write_json(run / "eval" / "test.json", test)
    verdict = suite_json("serve-mini", [
        {"id": "garments-01", "category": "garments", "text": "a black leather jacket", "mrr": 1.0, "passed": True},
        {"id": "similar-01", "category": "similar", "text": None, "mrr": 0.2, "passed": False},
    ], catalogue=catalogue)  # fmt: skip
    write_json(run / "suite" / "serve-mini.json", verdict)
    model = load_model(run / "model")
    index = build_index(
        model, read_catalogue(catalogue), root / "index", cache_dir=root / "cache", progress=False
    )
    suite = root / "serve-mini.yaml"
    suite.write_text(SUITE_YAML)
    return Served(catalogue=catalogue, run=run, index=index, suite=suite)


@contextmanager
def live_server(app: Any, *, timeout: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a daemon thread; yields ``http://127.0.0.1:PORT``.

    The socket is bound here (port 0: the OS picks a free port) and handed to uvicorn, so no other
    process can take the port between choosing and binding it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
