"""Which images a suite ranks: by default a run's held-out split, so a gate measures what training never saw.

A fine-tuned model ranks its own training images well, so a gate over the whole catalogue is optimistic by
an unknown amount. The rule (``docs/suites.md``, "Which images are ranked"):

- a run (or a bare model borrowing a run's splits) ranks the run's ``test`` split, else its ``val`` split
  (the first that has groups in ``splits.json``); a run with neither is an error, never a silent
  fall-back to training images;
- a named split ranks that split's images; ``all`` ranks every catalogue image;
- without any run splits (a bare model, or a folder with no ``splits.json``) every image is ranked, and
  :attr:`RankedImages.note` says so.

Example:
    >>> ranked = ranked_images(Path("runs/demo"), None)  # doctest: +SKIP
    >>> ranked.split, len(ranked.items)  # doctest: +SKIP
    ('test', 44)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cliptune.data.splits import load_splits
from cliptune.errors import CliptuneError
from cliptune.evaluation.catalogue import split_order
from cliptune.evaluation.run import split_files
from cliptune.rundir import SPLITS_FILE, RunDir

__all__ = ["ALL", "HELDOUT_ORDER", "RankedImages", "RankedSplitError", "heldout_split", "ranked_images"]

ALL = "all"  # the split name that means every catalogue image
HELDOUT_ORDER = ("test", "val")  # the default: the first of these with groups


class RankedSplitError(CliptuneError, ValueError):
    """The images asked for cannot be ranked: no held-out split, an unknown split, or an empty one.

    Attributes:
        run_dir: The run whose splits were asked for (None: no run).
        split: The split asked for (None: the default held-out split).
        available: The run's splits that hold groups.
    """

    def __init__(
        self, run_dir: Path | None, split: str | None, available: Sequence[str], reason: str
    ) -> None:
        self.run_dir, self.split, self.available = run_dir, split, list(available)
        where = f"{run_dir}: " if run_dir is not None else ""
        have = f" (splits with groups: {', '.join(self.available) or 'none'})" if run_dir is not None else ""
        super().__init__(f"{where}{reason}{have}")


@dataclass(frozen=True)
class RankedImages:
    """The images a suite ranks, and where that choice came from.

    Attributes:
        split: A split name of ``splits_from``, or ``"all"``.
        items: Their ``file_name`` values (catalogue order); None: every catalogue image.
        splits_from: The run whose ``splits.json`` chose them (None: no run's splits).
        note: Why every image is ranked, when that was not asked for (no run splits), else None.
    """

    split: str
    items: list[str] | None
    splits_from: Path | None
    note: str | None = None


def heldout_split(splits: Mapping[str, Sequence[str]]) -> str | None:
    """The default split a gate ranks: ``test``, else ``val`` (the first with groups), else None."""
    return next((name for name in HELDOUT_ORDER if splits.get(name)), None)


def ranked_images(
    run_dir: Path | None,
    split: str | None,
    *,
    catalogue: Path | None = None,
    progress: bool = False,
    required: bool = False,
) -> RankedImages:
    """Choose the images a suite ranks (the rule is in the module docstring).

    Args:
        run_dir: The run whose ``splits.json`` says which groups are in which split; None: no run (every
            image, unless a split is asked for, which is an error).
        split: A split name, ``"all"``, or None for the run's held-out split.
        catalogue: Another copy of the run's catalogue (default: its ``data.catalogue``).
        progress: Progress bar while the catalogue is checked.
        required: ``run_dir``'s splits were asked for by name (a bare model borrowing them): a run
            without ``splits.json`` is then an error, not every image.

    Returns:
        The :class:`RankedImages`.

    Raises:
        RankedSplitError: A split asked for without a run, or of a run without ``splits.json`` (any split
            but ``all`` when ``required``); a run without a held-out split; an unknown split; a split with
            no images.
        EvalError, CatalogueError: From reading the run's catalogue.
    """
    if split == ALL:
        return RankedImages(ALL, None, None)
    if run_dir is None or not RunDir(run_dir).splits.is_file():
        if split is not None or (required and run_dir is not None):
            what = f"split '{split}'" if split is not None else "a held-out split"
            raise RankedSplitError(run_dir, split, [], f"no {SPLITS_FILE} to take {what} from")
        why = "no run splits" if run_dir is None else f"{run_dir} has no {SPLITS_FILE}"
        return RankedImages(ALL, None, None, f"{why}: every catalogue image is ranked")
    splits = load_splits(RunDir(run_dir).splits)
    available = [name for name in split_order(splits) if splits[name]]
    name = split if split is not None else heldout_split(splits)
    if name is None:
        raise RankedSplitError(
            run_dir,
            split,
            available,
            "no held-out split (no test or val groups): every image trained the model",
        )
    if name not in splits:
        raise RankedSplitError(run_dir, split, available, f"no split '{name}'")
    items = split_files(run_dir, name, catalogue=catalogue, progress=progress) if splits[name] else []
    if not items:
        raise RankedSplitError(run_dir, split, available, f"split '{name}' has no images")
    return RankedImages(name, items, run_dir)
