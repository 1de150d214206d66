"""``cliptune serve``'s API: real answers (the same hits as ``cliptune.search``), every hardening guard, concurrency.

One tiny CLIP saved as a run's ``model/`` and a 40-photo synthetic catalogue indexed with it serve every
test; the oracles are the library functions themselves (``search``, ``search_embeddings``, ``run_suite``)
called on the same index, and the run's own JSON files.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from cliptune.cli.app import app as cli_app
from cliptune.data.catalogue import read_catalogue
from cliptune.data.synthetic import render_fashion
from cliptune.models.factory import LoadedModel, load_model
from cliptune.search import SearchIndex, build_index, load_index, search, search_embeddings
from cliptune.serve.app import create_app
from cliptune.serve.limits import Limits
from cliptune.suites.run import run_suite
from cliptune.suites.schema import load_suite
from tests.launched import free_port
from tests.tiny_models import make_tiny_clip

METRICS: dict[str, dict[str, float]] = {
    "t2i/mrr": {"mean": 0.41, "low": 0.33, "high": 0.5, "n": 40, "confidence": 0.95},
    "i2t/recall@5": {"mean": 0.6, "low": 0.45, "high": 0.72, "n": 40, "confidence": 0.95},
}
SUITE_RESULT = {
    "suite": "fashion-behaviour",
    "passed": False,
    "categories": {"rips": {"passed": False}, "colours": {"passed": True}},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def fashion(root: Path) -> Path:
    return render_fashion(root / "fashion", n=40, seed=0)  # 40 photos + suite.yaml


@pytest.fixture(scope="module")
def run(root: Path) -> Path:
    """A run folder as far as serve reads it: config.yaml, model/, eval/test.json, suite/<name>.json."""
    run = root / "run"
    make_tiny_clip(run / "model", seed=0)
    (run / "config.yaml").write_text("name: run\n")
    (run / "eval").mkdir()
    (run / "eval" / "test.json").write_text(json.dumps({"split": "test", "metrics": METRICS}))
    (run / "suite").mkdir()
    (run / "suite" / "fashion-behaviour.json").write_text(json.dumps(SUITE_RESULT))
    return run


@pytest.fixture(scope="module")
def model(run: Path) -> LoadedModel:
    return load_model(run / "model")


@pytest.fixture(scope="module")
def built(root: Path, fashion: Path, model: LoadedModel) -> Path:
    return build_index(model, read_catalogue(fashion), root / "idx", cache_dir=root / "cache", progress=False)


@pytest.fixture(scope="module")
def index(built: Path) -> SearchIndex:
    return load_index(built)


@pytest.fixture(scope="module")
def client(built: Path, fashion: Path, root: Path) -> TestClient:
    return TestClient(create_app(built, suite=fashion / "suite.yaml", cache_dir=root / "cache"))


@pytest.fixture(scope="module")
def small(built: Path) -> TestClient:
    """The same index with a 2,000-byte upload limit."""
    return TestClient(create_app(built, limits=Limits(max_upload_bytes=2000)))


def _pairs(hits: list[Any]) -> list[tuple[str, float]]:
    return [(h["id"], h["score"]) if isinstance(h, dict) else (h.id, h.score) for h in hits]


def _same_hits(got: list[dict[str, Any]], expected: list[Any]) -> None:
    assert [g["id"] for g in got] == [e.id for e in expected]
    assert [g["rank"] for g in got] == [e.rank for e in expected]
    np.testing.assert_allclose([g["score"] for g in got], [e.score for e in expected], rtol=0, atol=1e-6)
    assert [g["caption"] for g in got] == [e.caption for e in expected]
    assert [g["attributes"] for g in got] == [e.attributes for e in expected]


def _detail(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    return str(body["detail"])


# --- real outcomes ------------------------------------------------------------------------------


def test_text_search_equals_the_library_search(
    client: TestClient, index: SearchIndex, model: LoadedModel, root: Path
) -> None:
    body = client.post("/search", json={"text": "ripped blue jeans", "k": 7}).json()
    expected = search(index, model, text="ripped blue jeans", k=7, cache_dir=root / "cache")
    _same_hits(body["hits"], expected)
    assert body["query"] == {"text": "ripped blue jeans", "image": None, "like": None}
    assert body["k"] == 7 and body["where"] == {} and body["took_ms"] > 0
    assert body["hits"][0]["image_url"] == f"/images/{expected[0].id}"


def test_filters_apply_before_top_k(
    client: TestClient, index: SearchIndex, model: LoadedModel, root: Path
) -> None:
    where = {"garment": ["jeans", "shorts"], "rips": True}
    body = client.post("/search", json={"text": "torn denim", "k": 10, "where": where}).json()
    expected = search(index, model, text="torn denim", k=10, where=where, cache_dir=root / "cache")
    _same_hits(body["hits"], expected)
    assert body["hits"], "the synthetic catalogue has ripped jeans or shorts"
    assert all(h["attributes"]["garment"] in ("jeans", "shorts") for h in body["hits"])
    assert all(h["attributes"]["rips"] in (True, "true") for h in body["hits"])


def test_image_upload_equals_search_with_the_file(
    client: TestClient, index: SearchIndex, model: LoadedModel, fashion: Path, root: Path
) -> None:
    query = fashion / "images" / "000005.png"
    files = {"image": ("my photo.png", query.read_bytes(), "image/png")}
    body = client.post("/search", files=files, data={"k": "5", "where": '{"garment": "sweater"}'}).json()
    expected = search(index, model, image=query, k=5, where={"garment": "sweater"}, cache_dir=root / "cache")
    _same_hits(body["hits"], expected)
    assert body["query"] == {"text": None, "image": "my photo.png", "like": None}
    assert not list(Path(client.app.state.served.uploads).glob("upload-*"))  # the temp file is gone


def test_more_like_this_ranks_the_items_own_vector(client: TestClient, index: SearchIndex) -> None:
    item = index.ids[12]
    body = client.post("/search", json={"like": item, "k": 4}).json()
    expected = search_embeddings(index, index.vectors()[12:13], k=4)[0]
    _same_hits(body["hits"], expected)
    assert body["hits"][0]["id"] == item  # the item itself first (score 1): documented in docs/serve.md


def test_images_serves_the_catalogue_bytes(client: TestClient, index: SearchIndex, fashion: Path) -> None:
    for item in index.ids[:3]:
        response = client.get(f"/images/{item}")
        assert response.status_code == 200
        assert response.content == (fashion / item).read_bytes()
        assert response.headers["content-type"] == "image/png"


def test_info_shows_the_runs_metrics_and_verdicts(client: TestClient, index: SearchIndex, run: Path) -> None:
    info = client.get("/info").json()
    assert info["model"] == index.model and info["model_source"] == str((run / "model").resolve())
    assert info["index"]["n"] == 40 and info["index"]["dim"] == 24
    assert info["attributes"]["garment"] == index.values("garment")
    assert info["run"]["path"] == str(run.resolve()) and info["run"]["name"] == "run"
    for key, value in METRICS.items():
        assert info["run"]["metrics"]["test"][key] == {f: value[f] for f in ("mean", "low", "high", "n")}
    assert info["run"]["suites"] == [
        {"name": "fashion-behaviour", "passed": False, "categories": {"rips": False, "colours": True}}
    ]
    assert info["suite"] == {"name": "fashion-behaviour", "queries": 45}
    assert info["limits"] == {
        "max_upload_bytes": 10 << 20,
        "max_query_chars": 1000,
        "max_k": 100,
        "max_image_pixels": 36_000_000,
    }
    assert client.get("/healthz").json() == {"status": "ok"}


def test_suite_results_match_the_gates_own_scoring(
    client: TestClient, model: LoadedModel, fashion: Path, root: Path
) -> None:
    got = client.get("/suite/results").json()
    gate = run_suite(
        load_suite(fashion / "suite.yaml"),
        model,
        read_catalogue(fashion),
        bootstrap=0,
        cache_dir=root / "cache",
    )
    assert got["name"] == "fashion-behaviour" and got["categories"] == list(gate["categories"])
    assert [q["id"] for q in got["queries"]] == [q["id"] for q in gate["queries"]]
    for mine, theirs in zip(got["queries"], gate["queries"], strict=True):
        assert mine["passed"] == theirs["passed"] and mine["k"] == theirs["k"]
        assert mine["metrics"] == pytest.approx(theirs["metrics"], abs=1e-6)
        assert [(h["id"], h["flag"]) for h in mine["hits"]] == [(t["id"], t["flag"]) for t in theirs["top"]]
    assert got["verdicts"] == {name: c["passed"] for name, c in gate["categories"].items()}
    flags = {h["flag"] for q in got["queries"] for h in q["hits"]}
    assert {"relevant", "red"} <= flags


def test_unknown_static_files_and_routes_are_404(client: TestClient) -> None:
    assert client.get("/static/no-such-file.js").status_code == 404
    assert client.get("/static/../../../etc/passwd").status_code == 404
    assert _detail(client.get("/no-such-route"), 404) == "Not Found"
    schema = client.get("/openapi.json").json()
    assert schema["paths"].keys() >= {"/search", "/info", "/healthz"}
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert body.keys() == {"application/json", "multipart/form-data"}


def test_suite_routes_are_404_without_a_suite(small: TestClient) -> None:
    assert "no suite" in _detail(small.get("/suite/results"), 404)
    assert small.get("/info").json()["suite"] is None


# --- hardening ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "/images/%2e%2e/secret.txt",
        "/images/..%2fsecret.txt",
        "/images/..%2F..%2Fsecret.txt",
        "/images/%252e%252e%252fsecret.txt",  # double encoded
        "/images/images%2f..%2f..%2fsecret.txt",
        "/images/images%2f..%2fimages%2f000001.png",  # resolves to a real item, but is not its id
        "/images//etc/passwd",
        "/images/%2fetc%2fpasswd",
    ],
)
def test_image_paths_from_the_url_are_never_opened(client: TestClient, root: Path, url: str) -> None:
    (root / "secret.txt").write_text("the secret")
    response = client.get(url)
    assert response.status_code == 404 and "the secret" not in response.text


def test_absolute_path_of_a_catalogue_file_is_not_an_id(client: TestClient, fashion: Path) -> None:
    absolute = (fashion / "images" / "000001.png").resolve()
    assert "no item" in _detail(client.get(f"/images/{absolute}"), 404)


def test_a_symlink_out_of_the_catalogue_is_refused(
    client: TestClient, index: SearchIndex, root: Path
) -> None:
    (root / "secret.txt").write_text("the secret")
    target = Path(index.paths[3])
    saved = target.read_bytes()
    target.unlink()
    target.symlink_to(root / "secret.txt")
    try:
        detail = _detail(client.get(f"/images/{index.ids[3]}"), 404)
        assert "outside the catalogue" in detail
    finally:
        target.unlink()
        target.write_bytes(saved)
    assert client.get(f"/images/{index.ids[3]}").content == saved


def test_upload_over_the_limit_is_413(small: TestClient, root: Path) -> None:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "tiny.png")
    tiny = (root / "tiny.png").read_bytes()
    assert len(tiny) < 2000
    assert small.post("/search", files={"image": ("ok.png", tiny, "image/png")}).status_code == 200
    big = tiny + b"\0" * 2000  # trailing bytes after IEND still decode: only the size refuses it
    detail = _detail(small.post("/search", files={"image": ("big.png", big)}), 413)
    assert detail == "the uploaded image exceeds the limit of 2,000 bytes"


def test_declared_content_length_over_the_limit_is_refused_unread(small: TestClient) -> None:
    body = b"--xyz\r\n" + b"\0" * 100_000  # never parsed: the declared length alone refuses it
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    detail = _detail(small.post("/search", content=body, headers=headers), 413)
    assert detail == f"the request declares {len(body):,} bytes; uploads are limited to 2,000 bytes"


def test_upload_without_content_length_is_counted_while_streaming(small: TestClient) -> None:
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()

    def chunks() -> Iterator[bytes]:  # a chunked body: no Content-Length to refuse up front
        yield head
        for _ in range(200):
            yield b"\0" * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    response = small.post(
        "/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert _detail(response, 413) == "the request body exceeds the upload limit of 2,000 bytes"


def test_html_named_jpg_is_415(client: TestClient) -> None:
    html = b"<!doctype html><html><body><script>alert(1)</script></body></html>"
    detail = _detail(client.post("/search", files={"image": ("cat.jpg", html, "image/jpeg")}), 415)
    assert detail == "the uploaded file 'cat.jpg' is not a usable image: not an image (unrecognised format)"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (8-bit RGB) and whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    bomb = _png_header(50_000, 50_000)
    assert len(bomb) < 200
    detail = _detail(client.post("/search", files={"image": ("bomb.png", bomb, "image/png")}), 415)
    assert "image too large" in detail and "2,500,000,000" in detail


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"text": "x" * 5000}, "the text query has 5,000 characters; the limit is 1,000"),
        ({"text": ""}, "the text query is empty"),
        ({"text": "   "}, "the text query is empty"),
        ({"text": "jeans", "k": 0}, "k must be between 1 and 100, got 0"),
        ({"text": "jeans", "k": 101}, "k must be between 1 and 100, got 101"),
        ({"text": "jeans", "k": "5"}, "k must be a whole number"),
        ({"text": "jeans", "like": "images/000001.png"}, "give exactly one query"),
        ({}, "give exactly one query"),
        ({"like": "images/nope.png"}, "like: no item 'images/nope.png'"),
        ({"text": "jeans", "colour": "blue"}, "unknown field(s) colour"),
        ({"text": "jeans", "where": {"colour": []}}, "non-empty list"),
    ],
)
def test_bad_queries_are_422_with_the_reason(client: TestClient, body: dict[str, Any], reason: str) -> None:
    assert reason in _detail(client.post("/search", json=body), 422)


def test_a_body_neither_json_nor_multipart_is_415(client: TestClient) -> None:
    response = client.post("/search", content=b"text=jeans", headers={"content-type": "text/plain"})
    assert "takes application/json or multipart/form-data, not text/plain" in _detail(response, 415)


def test_unknown_filter_attribute_names_the_valid_ones(client: TestClient, index: SearchIndex) -> None:
    detail = _detail(client.post("/search", json={"text": "jeans", "where": {"fabric": "denim"}}), 422)
    assert detail == f"unknown filter attribute 'fabric'; valid attributes: {', '.join(index.attributes)}"
    form = client.post("/search", files={"image": ("a.png", b"x")}, data={"where": '{"fabric": "x"}'})
    assert "unknown filter attribute 'fabric'" in _detail(form, 422)


def test_cli_binds_loopback_unless_told(monkeypatch: pytest.MonkeyPatch, built: Path) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    runner = CliRunner()
    assert runner.invoke(cli_app, ["serve", str(built)]).exit_code == 0
    assert runner.invoke(cli_app, ["serve", str(built), "--host", "0.0.0.0", "--port", "9001"]).exit_code == 0
    assert [(c["host"], c["port"]) for c in calls] == [("127.0.0.1", 8000), ("0.0.0.0", 9001)]


def test_cli_errors_end_in_one_sentence(built: Path, root: Path) -> None:
    missing = CliRunner().invoke(cli_app, ["serve", str(root / "nowhere")])
    assert (
        missing.exit_code == 1
        and "not a cliptune index" in missing.output
        and "Traceback" not in missing.output
    )
    other = make_tiny_clip(root / "other", seed=1)
    mismatch = CliRunner().invoke(cli_app, ["serve", str(built), "--model", str(other)])
    assert mismatch.exit_code == 1 and "was built with model" in mismatch.output


# --- concurrency --------------------------------------------------------------------------------


def test_parallel_requests_get_the_sequential_answers(built: Path, index: SearchIndex, fashion: Path) -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(built), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        base = f"http://127.0.0.1:{port}"
        image = (fashion / "images" / "000007.png").read_bytes()
        texts = ["ripped jeans", "a red dress", "black leather jacket", "striped shirt", "blue shorts"]

        def ask(i: int) -> list[tuple[str, float]]:
            with httpx.Client(base_url=base, timeout=30) as http:
                if i % 3 == 2:
                    response = http.post("/search", files={"image": ("q.png", image)}, data={"k": "5"})
                elif i % 3 == 1:
                    response = http.post("/search", json={"like": index.ids[i], "k": 5})
                else:
                    response = http.post("/search", json={"text": texts[i % len(texts)], "k": 5})
                assert response.status_code == 200, response.text
                return _pairs(response.json()["hits"])

        sequential = [ask(i) for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            parallel = list(pool.map(ask, range(24)))
        assert parallel == sequential
    finally:
        server.should_exit = True
        thread.join(timeout=10)
