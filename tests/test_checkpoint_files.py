"""One checkpoint folder, in-process and fast: what is stored (trainable weights and buffers, the process
count), what a resume checks (world size, weights, early stopping), pruning that keeps the best, and how
damage is found and named. tests/test_checkpoint_recovery.py runs the same through whole training runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from cliptune.errors import CliptuneError
from cliptune.models.backbone import WeightsMismatchError
from cliptune.train.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TRAINER_FILE,
    WEIGHTS_FILE,
    CheckpointDamagedError,
    Resumable,
    damaged_files,
    latest_checkpoint,
    newest_intact_checkpoint,
    restore_loop_checkpoint,
    save_checkpoint,
    save_loop_checkpoint,
    truncate_log,
)
from cliptune.train.early_stopping import EarlyStopping
from cliptune.train.errors import NothingToResumeError, WorldSizeMismatchError
from cliptune.train.state import LoopState, MetricsLog


class _Net(nn.Module):
    """A trainable layer, a frozen layer and a norm with running statistics (buffers)."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, 2)


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def _parts(seed: int = 0, stopper: EarlyStopping | None = None, width: int = 3) -> Resumable:
    torch.manual_seed(seed)
    model = _Net(width)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Resumable(model, optimizer, scheduler, LoopState(), stopper)


def _save(directory: Path, name: str, trainer_state: dict[str, object]) -> Path:
    parts = _parts()
    return save_checkpoint(
        directory,
        name,
        model_state={k: v for k, v in parts.model.state_dict().items() if not k.startswith("frozen.")},
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        trainer_state=trainer_state,
    )


def test_a_checkpoint_stores_trainable_weights_buffers_and_the_process_count(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    parts = _parts(stopper=EarlyStopping(metric="val/loss", mode="min", patience=2))
    parts.state.step = 7
    parts.stopper.update(0.5)  # type: ignore[union-attr]
    path = save_loop_checkpoint(tmp_path, accelerator, parts, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-00000007"
    assert sorted(load_file(path / WEIGHTS_FILE)) == [
        "head.bias",
        "head.weight",
        "norm.bias",
        "norm.num_batches_tracked",
        "norm.running_mean",
        "norm.running_var",
        "norm.weight",
    ]  # the frozen layer is rebuilt from the config, not stored
    trainer = json.loads((path / TRAINER_FILE).read_text())
    assert trainer["processes"] == 1 and trainer["loop"]["step"] == 7
    assert trainer["early_stopping"] == parts.stopper.state_dict()  # type: ignore[union-attr]
    # sorted and indented, so two checkpoints' files diff line by line
    assert (path / TRAINER_FILE).read_text() == json.dumps(trainer, indent=2, sort_keys=True)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert (path / MANIFEST_FILE).read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    assert (path / "../latest").resolve().read_text() == "step-00000007"


def test_resume_loads_every_saved_tensor_and_leaves_frozen_weights_alone(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    saved = _parts(seed=0)
    with torch.no_grad():
        saved.model.norm.running_mean.fill_(0.25)  # type: ignore[union-attr, operator]
    saved.state.step = 3
    save_loop_checkpoint(tmp_path, accelerator, saved, keep_last=1)
    resumed = _parts(seed=1)  # other random init everywhere
    frozen = resumed.model.frozen.weight.clone()  # type: ignore[union-attr, operator]
    restore_loop_checkpoint(tmp_path, accelerator, resumed, MetricsLog(tmp_path / "metrics.jsonl"))
    for key, value in saved.model.state_dict().items():
        now = resumed.model.state_dict()[key]
        assert torch.equal(now, frozen if key == "frozen.weight" else value) or key == "frozen.bias", key
    assert resumed.state.step == 3


def test_resume_into_another_shape_names_the_weights_file(tmp_path: Path, accelerator: Accelerator) -> None:
    save_loop_checkpoint(tmp_path, accelerator, _parts(), keep_last=1)
    with pytest.raises(WeightsMismatchError) as info:
        restore_loop_checkpoint(tmp_path, accelerator, _parts(width=4), MetricsLog(tmp_path / "m.jsonl"))
    assert str(tmp_path / "checkpoints" / "step-00000000" / WEIGHTS_FILE) in str(info.value)


def test_resume_without_early_stopping_ignores_its_saved_state(
    tmp_path: Path, accelerator: Accelerator
) -> None:
    saved = _parts(stopper=EarlyStopping(metric="val/loss", mode="min", patience=2))
    save_loop_checkpoint(tmp_path, accelerator, saved, keep_last=1)
    resumed = _parts()
    restore_loop_checkpoint(tmp_path, accelerator, resumed, MetricsLog(tmp_path / "m.jsonl"))
    assert resumed.stopper is None


def test_world_size_is_checked_and_defaults_to_one_process(
    tmp_path: Path, accelerator: Accelerator, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpts = tmp_path / "checkpoints"
    state = {"loop": LoopState().state_dict(), "early_stopping": None}
    path = _save(ckpts, "step-00000002", {**state, "processes": 2})
    with pytest.raises(WorldSizeMismatchError) as info:
        restore_loop_checkpoint(tmp_path, accelerator, _parts(), MetricsLog(tmp_path / "m.jsonl"))
    assert (info.value.checkpoint, info.value.saved, info.value.now) == (path, 2, 1)
    assert str(info.value).startswith(f"{path} was written by a run with 2 process(es); this resume has 1")
    _save(ckpts, "step-00000003", state)  # written before the count was recorded: one process
    restore_loop_checkpoint(tmp_path, accelerator, _parts(), MetricsLog(tmp_path / "m.jsonl"))
    assert capsys.readouterr().err == ""  # nothing damaged, nothing to warn about


def test_pruning_keeps_the_newest_and_the_best(tmp_path: Path, accelerator: Accelerator) -> None:
    parts = _parts()
    parts.state.best_step = 1
    for step in (1, 2, 3, 4):
        parts.state.step = step
        save_loop_checkpoint(tmp_path, accelerator, parts, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-00000001",
        "step-00000003",
        "step-00000004",
    ]


def test_checkpoints_folder_is_made_with_its_parents(tmp_path: Path) -> None:
    path = _save(tmp_path / "runs" / "new" / "checkpoints", "step-00000001", {"loop": {}})
    assert damaged_files(path) == {}


def test_damage_messages_join_files_and_checkpoints() -> None:
    ckpts = Path("runs/x/checkpoints")
    error = CheckpointDamagedError(
        ckpts,
        {
            ckpts / "step-2": {"state.pt": "is missing", "trainer.json": "has 3 bytes, 9 written"},
            ckpts / "step-1": {"manifest.json": "is missing"},
        },
    )
    assert isinstance(error, CliptuneError)
    assert str(error) == (
        f"no intact checkpoint in {ckpts} to resume from: {ckpts}/step-2/state.pt is missing, "
        f"{ckpts}/step-2/trainer.json has 3 bytes, 9 written; {ckpts}/step-1/manifest.json is missing"
    )


def test_only_step_folders_are_checkpoints_and_a_folder_without_manifest_or_trainer_is_damaged(
    tmp_path: Path,
) -> None:
    ckpts = tmp_path / "checkpoints"
    with pytest.raises(NothingToResumeError) as info:
        newest_intact_checkpoint(ckpts)  # no folder at all
    assert (
        info.value.checkpoints == ckpts and str(info.value) == f"nothing to resume: no checkpoint in {ckpts}"
    )
    good = _save(ckpts, "step-00000004", {"loop": {}})
    (ckpts / "zz-notes").mkdir()  # sorts after every step-: not a checkpoint
    (ckpts / ".step-00000005.tmp-0123").mkdir()  # an interrupted write's folder
    assert newest_intact_checkpoint(ckpts) == (good, {})
    stub = ckpts / "step-00000005"
    stub.mkdir()
    (stub / WEIGHTS_FILE).write_bytes(b"x")  # neither a manifest nor trainer.json: not even old-format
    assert damaged_files(stub) == {MANIFEST_FILE: "is missing"}
    assert newest_intact_checkpoint(ckpts) == (good, {stub: {MANIFEST_FILE: "is missing"}})


def test_old_format_checkpoint_is_checked_by_loading_each_file(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    good = _save(ckpts, "step-00000001", {"loop": {}})
    bad = _save(ckpts, "step-00000002", {"loop": {}})
    for path in (good, bad):
        (path / MANIFEST_FILE).unlink()  # as written before manifests
    (bad / TRAINER_FILE).write_text("")
    data = (bad / STATE_FILE).read_bytes()
    (bad / STATE_FILE).write_bytes(data[: len(data) // 2])
    try:
        torch.load(bad / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is what the checker must quote
        raised = f"{type(exc).__name__}: {str(exc)[:120]}"
    assert newest_intact_checkpoint(ckpts) == (
        good,
        {
            bad: {
                STATE_FILE: f"fails to load ({raised})",
                TRAINER_FILE: "fails to load (JSONDecodeError: Expecting value: line 1 column 1 (char 0))",
            }
        },
    )


def test_a_torn_metrics_line_is_named_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    truncate_log(log, 1)
    assert log.path.read_text() == '{"step": 1}\n'
    assert capsys.readouterr().err == (
        f"warning: {log.path}:3 was cut short by an interrupted write; dropped (the resumed run logs it again)\n"
    )


def test_latest_names_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts) is None  # nothing written yet
    _save(ckpts, "step-00000001", {"loop": {}})
    newest = _save(ckpts, "step-00000002", {"loop": {}})
    assert latest_checkpoint(ckpts) == newest
    (ckpts / "latest").write_text("step-00000002\n")  # an edited pointer: the name, stripped
    assert latest_checkpoint(ckpts) == newest
    (newest / TRAINER_FILE).unlink()  # not complete
    assert latest_checkpoint(ckpts) is None


def test_every_damaged_file_of_a_checkpoint_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path / "checkpoints", "step-00000001", {"loop": {}})
    (path / WEIGHTS_FILE).unlink()  # the first file the manifest lists
    (path / TRAINER_FILE).write_text("{}")
    size = len(json.dumps({"loop": {}}, indent=2, sort_keys=True))
    assert damaged_files(path) == {WEIGHTS_FILE: "is missing", TRAINER_FILE: f"has 2 bytes, {size} written"}
