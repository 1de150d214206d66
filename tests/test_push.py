"""``cliptune push``: exactly the staged files reach the hub client; every hub failure is a typed sentence.

No network: a stand-in client records the calls, and the real ``HfApi`` is only ever met in offline mode.
The run is crafted (test_report's ``write_run``) with a small fake model folder: staging reads files, it
loads no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError
from typer.testing import CliRunner

from cliptune.cli.app import app
from cliptune.errors import CliptuneError
from cliptune.export.card import model_card
from cliptune.export.hub import PushError, hub_failure, push, stage
from tests.test_report import write_run

runner = CliRunner()

MODEL_FILES = {
    "cliptune_backbone.json": json.dumps(
        {"kind": "clip", "model_identity": "abc123", "embed_dim": 4}
    ).encode(),
    "model.safetensors": b"\x00\x01weights" * 10,
    "tokenizer.json": b'{"vocab": {}}',
}


class FakeApi:
    """Records create_repo / create_commit (with each operation's bytes, read while the call runs)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail = fail

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id: str, operations: list[CommitOperationAdd], **kwargs: Any) -> None:
        self.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
        for op in operations:
            with op.as_file() as f:
                self.uploaded[op.path_in_repo] = f.read()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run_dir = write_run(tmp_path / "runs" / "tuned", [{"val/loss": 1.0}, {"val/loss": 0.8}], summary={})
    (run_dir / "model" / "sub").mkdir(parents=True)
    for name, data in MODEL_FILES.items():
        (run_dir / "model" / name).write_bytes(data)
    (run_dir / "model" / "sub" / "head.bin").write_bytes(b"head")
    (run_dir / "model" / ".model.safetensors.0123.tmp").write_bytes(b"a killed write's leftover")
    return run_dir


def _api(fake: FakeApi) -> HfApi:
    return fake  # type: ignore[return-value]  # a stand-in with the two methods push calls


def test_push_uploads_exactly_the_model_folder_and_the_card(run: Path) -> None:
    fake = FakeApi()
    url = push(run, "me/tuned", private=True, token="tok", api=_api(fake))
    assert url == "https://huggingface.co/me/tuned"
    expected = {**MODEL_FILES, "sub/head.bin": b"head", "README.md": model_card(run).encode()}
    assert fake.uploaded == expected  # the hidden temp file stays behind
    (create, repo), (commit, kwargs) = fake.calls
    assert create == "create_repo" and commit == "create_commit"
    assert repo == {
        "repo_id": "me/tuned",
        "token": "tok",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    assert kwargs["repo_id"] == "me/tuned" and kwargs["commit_message"] == "cliptune push tuned"


def test_private_defaults_to_false_and_onnx_goes_under_onnx(run: Path, tmp_path: Path) -> None:
    onnx = tmp_path / "export"
    onnx.mkdir()
    (onnx / "image.onnx").write_bytes(b"graph")
    fake = FakeApi()
    push(run, "me/tuned", onnx=onnx, api=_api(fake))
    assert fake.calls[0][1]["private"] is False
    assert fake.uploaded["onnx/image.onnx"] == b"graph"
    assert "ONNX graphs (image.onnx; under onnx/ in a hub repository" in fake.uploaded["README.md"].decode()


def _http(status: int) -> HfHubHTTPError:
    response = httpx2.Response(
        status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    )
    return HfHubHTTPError(f"{status} error", response=response)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (LocalTokenNotFoundError("no token"), "no Hugging Face token"),
        (_http(401), "rejected the token (401"),
        (RepositoryNotFoundError("404", response=_http(404).response), "not found"),
        (httpx2.ConnectError("Name or service not known"), "the hub is unreachable (ConnectError"),
    ],
)
def test_hub_failures_become_a_typed_error_naming_the_repo(
    run: Path, failure: Exception, reason: str
) -> None:
    with pytest.raises(PushError) as caught:
        push(run, "me/tuned", api=_api(FakeApi(fail=failure)))
    assert isinstance(caught.value, CliptuneError)
    assert caught.value.repo_id == "me/tuned" and reason in caught.value.reason
    assert str(caught.value).startswith("cannot push to me/tuned: ")


def test_a_bug_is_not_disguised_as_a_hub_failure() -> None:
    assert hub_failure(KeyError("x")) is None


def test_offline_with_the_real_client_is_a_sentence_without_traceback(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="offline mode is on"):
        push(run, "me/tuned")
    result = runner.invoke(app, ["push", str(run), "me/tuned", "--private"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "push failed: cannot push to me/tuned: offline mode is on (HF_HUB_OFFLINE is set), so the hub "
        "cannot be reached"
    ]


def test_no_token_names_the_flag_in_the_cli(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: HfApi, *args: Any, **kwargs: Any) -> str:
        raise LocalTokenNotFoundError("Token is required")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    result = runner.invoke(app, ["push", str(run), "me/tuned"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no Hugging Face token" in result.output and "pass --token or set HF_TOKEN" in result.output


def test_dry_run_lists_the_files_and_uploads_nothing(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(self: HfApi, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run called the hub")

    monkeypatch.setattr(HfApi, "create_repo", forbidden)
    monkeypatch.setattr(HfApi, "create_commit", forbidden)
    result = runner.invoke(app, ["push", str(run), "me/tuned", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines()[:-1]]
    assert listed == ["README.md", *sorted([*MODEL_FILES, "sub/head.bin"])]
    assert listed == [f.path_in_repo for f in stage(run)]
    size = sum(len(b) for b in MODEL_FILES.values()) + len(b"head") + len(model_card(run).encode())
    assert (
        result.output.splitlines()[-1]
        == f"dry run: 5 file(s), {size} bytes, would go to me/tuned; nothing uploaded"
    )


def test_not_a_run_is_one_sentence(tmp_path: Path) -> None:
    result = runner.invoke(app, ["push", str(tmp_path), "me/tuned", "--dry-run"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path}: not a run directory" in result.output
