"""Push a run's model to the Hugging Face Hub: the model folder, its model card, and an ONNX export.

The repository gets exactly what :func:`~cliptune.models.factory.load_model` needs (the files of
``RUN/model`` at the repo root, so ``load_model(snapshot_download(repo_id))`` works), the card as
``README.md`` (:mod:`cliptune.export.card`) and, when given, an ONNX export folder under ``onnx/``. The
files go up in one commit (``create_commit`` with one ``CommitOperationAdd`` per file), so a reader of the
repo never sees the weights without their card. Nothing is copied: the operations point at the run's
files, and the card is uploaded from memory.

Every failure the hub can give (no token, a rejected token, a missing repo, no network, offline mode) is
raised as :class:`PushError` with the repo id and the reason, never as huggingface_hub's own exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cliptune.errors import CliptuneError
from cliptune.export.card import CARD_FILE, CardError, model_card
from cliptune.rundir import RunDir

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["ONNX_DIR", "PushError", "StagedFile", "push", "stage"]

ONNX_DIR = "onnx"
"""Where an ONNX export goes in the repository."""


OFFLINE = "offline mode is on (HF_HUB_OFFLINE is set), so the hub cannot be reached"


class PushError(CliptuneError):
    """A run cannot be pushed to the hub.

    Attributes:
        repo_id: The repository (``user/name``).
        reason: What went wrong, in words (no token, rejected token, not found, unreachable, offline).
    """

    def __init__(self, repo_id: str, reason: str) -> None:
        self.repo_id, self.reason = repo_id, reason
        super().__init__(f"cannot push to {repo_id}: {reason}")


@dataclass(frozen=True)
class StagedFile:
    """One file of the repository: its path there and its source (a file, or bytes made here)."""

    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        """Bytes it uploads."""
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def stage(
    run: Path,
    *,
    onnx: Path | None = None,
    baseline: Path | None = None,
    license: str | None = None,  # noqa: A002 (the model-card field's own name)
) -> list[StagedFile]:
    """The files a push uploads, in repository order: ``README.md``, the model folder, ``onnx/``.

    Args:
        run: ``runs/<name>``.
        onnx: A folder ``cliptune export --format onnx`` wrote, uploaded under ``onnx/``.
        baseline: The card's baseline (a run or model-evaluation folder; see ``model_card``).
        license: The card's licence id.

    Returns:
        One :class:`StagedFile` per file; the card is rendered now (bytes), the others are the run's files.

    Raises:
        CardError: ``run`` is not a run directory, or ``onnx`` is not a folder.

    Example:
        >>> [f.path_in_repo for f in stage(Path("runs/demo-finetuned"))]  # doctest: +SKIP
        ['README.md', 'cliptune_backbone.json', 'config.json', 'model.safetensors', ...]
    """
    run = Path(run)
    if onnx is not None and not Path(onnx).is_dir():
        raise CardError(Path(onnx), "the ONNX export folder does not exist")
    card = model_card(run, baseline=baseline, onnx=onnx, license=license).encode("utf-8")
    files = [StagedFile(CARD_FILE, card)]
    files += _folder(RunDir(run).model, "")
    if onnx is not None:
        files += _folder(Path(onnx), f"{ONNX_DIR}/")
    return files


def _folder(folder: Path, prefix: str) -> list[StagedFile]:
    # Hidden files are what an interrupted atomic write left (rundir.clean_stale_temps): never uploaded.
    found = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return [
        StagedFile(prefix + p.relative_to(folder).as_posix(), p)
        for p in found
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def push(
    run: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    onnx: Path | None = None,
    baseline: Path | None = None,
    license: str | None = None,  # noqa: A002
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create (or reuse) ``repo_id`` and upload the run's model, card and ONNX export in one commit.

    Args:
        run: ``runs/<name>``.
        repo_id: ``user/name`` or ``org/name``.
        private: Create the repository private (an existing repository keeps its visibility).
        token: A hub token; default huggingface_hub's (``HF_TOKEN``, then the saved login).
        onnx: An ONNX export folder to upload under ``onnx/``.
        baseline: The card's baseline (a run or model-evaluation folder).
        license: The card's licence id.
        revision: The branch to commit to (default ``main``).
        commit_message: Default ``"cliptune push <run name>"``.
        api: The client (tests pass a stand-in); default ``HfApi(token=token)``.

    Returns:
        The repository's URL.

    Raises:
        CardError: Not a run directory, or ``onnx`` is not a folder.
        PushError: The hub refused or could not be reached (the reason says which: offline mode, no
            token, rejected token, not found, network).

    Example:
        >>> push(Path("runs/demo-finetuned"), "me/fashion-clip", private=True)  # doctest: +SKIP
        'https://huggingface.co/me/fashion-clip'
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    files = stage(run, onnx=onnx, baseline=baseline, license=license)
    if api is None:
        # huggingface_hub reads HF_HUB_OFFLINE once, at import: the variable set later is honoured here.
        if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            raise PushError(repo_id, OFFLINE)
        api = HfApi(token=token)
    operations = [
        CommitOperationAdd(
            path_in_repo=f.path_in_repo,
            path_or_fileobj=f.source if isinstance(f.source, bytes) else str(f.source),
        )
        for f in files
    ]
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"cliptune push {Path(run).name}",
            token=token,
            revision=revision,
            repo_type="model",
        )
    except Exception as exc:
        reason = hub_failure(exc)
        if reason is None:
            raise
        raise PushError(repo_id, reason) from exc
    return str(url)


def hub_failure(exc: BaseException) -> str | None:
    """The reason, in words, of a hub failure a user can fix; None for anything else (a bug).

    Example:
        >>> from huggingface_hub.errors import OfflineModeIsEnabled
        >>> hub_failure(OfflineModeIsEnabled("offline"))
        'offline mode is on (HF_HUB_OFFLINE is set), so the hub cannot be reached'
    """
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):  # before ConnectionError: it is one
        return OFFLINE
    if isinstance(exc, LocalTokenNotFoundError):
        return "no Hugging Face token was given or saved (HF_TOKEN, or `hf auth login`)"
    if isinstance(exc, RepositoryNotFoundError):
        return "the repository was not found, or the token has no access to it (404)"
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return "the hub rejected the token (401 unauthorized)"
        if status == 403:
            return "the token may not write to this repository (403 forbidden)"
        return f"the hub answered {status}: {' '.join(str(exc).split())[:200]}"
    if isinstance(exc, ConnectionError | TimeoutError) or _is_transport_error(exc):
        return f"the hub is unreachable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return None


def _is_transport_error(exc: BaseException) -> bool:
    # huggingface_hub 2.x talks through httpx2, 1.x through httpx, older releases through requests.
    pairs = (
        ("httpx2", "TransportError"),
        ("httpx", "TransportError"),
        ("requests.exceptions", "ConnectionError"),
    )
    for module, name in pairs:
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(exc, cls):
            return True
    return False
