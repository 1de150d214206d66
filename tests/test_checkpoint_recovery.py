"""Damaged checkpoints and run files: verified on resume, the newest intact one used, damage named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cliptune import rundir as rundir_module
from cliptune.rundir import DamagedFileError, read_json, read_jsonl, read_metrics
from cliptune.train import checkpoint as checkpoint_module
from cliptune.train.checkpoint import (
    MANIFEST_FILE,
    CheckpointDamagedError,
    damaged_files,
    load_checkpoint,
    newest_intact_checkpoint,
    save_checkpoint,
)
from tests.toy_task import run, toy_train_config

CFG = toy_train_config(epochs=3, batch_size=50, lr=0.01, early_stopping=None, keep_last=3)  # 4 steps/epoch


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert (a / "model" / "toy.safetensors").read_bytes() == (b / "model" / "toy.safetensors").read_bytes()


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("full")
    run(path, CFG)
    return path


def _two_epochs(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    run(path, CFG.model_copy(update={"epochs": 2}))
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == [
        "latest",
        "step-00000004",
        "step-00000008",
    ]
    return path


def test_manifest_records_sizes_and_hashes_written(tmp_path: Path) -> None:
    path = _two_epochs(tmp_path) / "checkpoints" / "step-00000008"
    manifest = read_json(path / MANIFEST_FILE)
    assert sorted(manifest) == ["model.safetensors", "state.pt", "trainer.json"]
    for name, entry in manifest.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert damaged_files(path) == {}


@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors", "trainer.json"])
def test_truncated_latest_falls_back_to_the_previous_and_resumes_exactly(
    tmp_path: Path, full: Path, victim: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _two_epochs(tmp_path)
    newest = path / "checkpoints" / "step-00000008"
    size = (newest / victim).stat().st_size
    _truncate(newest / victim, size // 2)
    assert damaged_files(newest) == {victim: f"has {size // 2} bytes, {size} written"}
    run(path, CFG, resume=True)  # from step 4, through the damaged step 8 again, to the end
    err = capsys.readouterr().err
    assert f"damaged checkpoint(s) skipped: {newest / victim} has {size // 2} bytes" in err
    assert "resuming from" in err and "step-00000004" in err
    _same_run(path, full)


def test_same_size_other_contents_is_caught_by_the_hash(tmp_path: Path) -> None:
    path = _two_epochs(tmp_path)
    trainer = path / "checkpoints" / "step-00000008" / "trainer.json"
    text = trainer.read_text()
    trainer.write_text(text.replace('"step": 8', '"step": 9'))
    assert damaged_files(trainer.parent) == {
        "trainer.json": "has other contents than were written (SHA-256 differs)"
    }
    assert newest_intact_checkpoint(path / "checkpoints")[0].name == "step-00000004"


def test_no_intact_checkpoint_names_every_damaged_file(tmp_path: Path) -> None:
    path = _two_epochs(tmp_path)
    ckpts = path / "checkpoints"
    _truncate(ckpts / "step-00000008" / "state.pt", 10)
    (ckpts / "step-00000004" / "model.safetensors").unlink()
    with pytest.raises(CheckpointDamagedError) as info:
        run(path, CFG, resume=True)
    message = str(info.value)
    assert f"no intact checkpoint in {ckpts} to resume from" in message
    assert f"{ckpts / 'step-00000008' / 'state.pt'} has 10 bytes" in message
    assert f"{ckpts / 'step-00000004' / 'model.safetensors'} is missing" in message
    assert list(info.value.damaged) == [ckpts / "step-00000008", ckpts / "step-00000004"]


def test_a_checkpoint_without_manifest_is_checked_by_loading(tmp_path: Path, full: Path) -> None:
    path = _two_epochs(tmp_path)
    for manifest in (path / "checkpoints").glob(f"*/{MANIFEST_FILE}"):
        manifest.unlink()  # as written before manifests existed
    _truncate(path / "checkpoints" / "step-00000008" / "state.pt", 100)
    found, damaged = newest_intact_checkpoint(path / "checkpoints")
    assert found.name == "step-00000004"
    (problems,) = damaged.values()
    assert list(problems) == ["state.pt"] and problems["state.pt"].startswith("fails to load (")
    run(path, CFG, resume=True)
    _same_run(path, full)


def test_torn_last_metrics_line_is_dropped_with_a_warning(
    tmp_path: Path, full: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _two_epochs(tmp_path)
    metrics = path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + '\n{"kind": "step", "epo')  # a kill mid-append
    run(path, CFG, resume=True)
    assert (
        f"{metrics}:{len(lines) + 1} was cut short by an interrupted write; dropped"
        in capsys.readouterr().err
    )
    _same_run(path, full)


def test_damaged_middle_metrics_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    path = _two_epochs(tmp_path)
    metrics = path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:7]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(DamagedFileError, match=rf"{metrics}:2 is damaged: not valid JSON") as info:
        run(path, CFG, resume=True)
    assert (info.value.path, info.value.line) == (metrics, 2)
    with pytest.raises(DamagedFileError, match=r"metrics.jsonl:2 is damaged"):
        read_metrics(path)  # the summary (and every rundir reader) names it the same way


def test_bad_json_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"best":\n')
    with pytest.raises(DamagedFileError) as info:
        read_json(tmp_path / "summary.json")
    assert str(info.value).startswith(
        f"{tmp_path / 'summary.json'}:2 is damaged: not valid JSON (Expecting value"
    )
    assert isinstance(info.value, ValueError)  # callers that caught json's error still catch it
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n[1, 2]\n{"b": 2}\n')
    with pytest.raises(DamagedFileError, match=r"m.jsonl:2 is damaged: not a JSON object \(a JSON list"):
        read_jsonl(tmp_path / "m.jsonl", torn_tail=True)  # a bad line that is not the last is never torn
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n\n{"b": 2}\n{"c"')
    assert read_jsonl(tmp_path / "m.jsonl", torn_tail=True) == ([{"a": 1}, {"b": 2}], 4)


def test_checkpoint_files_are_fsynced_before_they_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Older checkpoints are pruned right after a new one is written: the new one must be on disk, not only
    # in the page cache, or a power cut could leave no intact checkpoint at all.
    written: list[tuple[str, bool]] = []
    real = checkpoint_module.write_bytes_atomic

    def recording(path: Path, data: bytes, *, fsync: bool = False) -> Path:
        written.append((path.name if path.parent.name == "checkpoints" else f"ckpt/{path.name}", fsync))
        return real(path, data, fsync=fsync)

    monkeypatch.setattr(checkpoint_module, "write_bytes_atomic", recording)
    monkeypatch.setattr(rundir_module, "write_bytes_atomic", recording)  # write_text_atomic's writer
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = save_checkpoint(
        tmp_path / "checkpoints",
        "step-00000003",
        model_state=model.state_dict(),
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state={"loop": {"step": 3}},
    )
    assert sorted(written) == [
        ("ckpt/manifest.json", True),
        ("ckpt/model.safetensors", True),
        ("ckpt/state.pt", True),
        ("ckpt/trainer.json", True),
        ("latest", True),
    ]
    assert damaged_files(path) == {}
    weights, state, trainer = load_checkpoint(path)  # the bytes written are the loadable formats
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert state["optimizer"] == optimizer.state_dict() and trainer == {"loop": {"step": 3}}
