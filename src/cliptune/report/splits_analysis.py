"""Comparing runs trained on different splits (seed 001: 80/20 vs 60/40), like for like.

Seed 001 reads "val loss 0.07816 vs 0.1148, 32% better" as a win for the 80/20 split, but the two val
sets are different data, and for retrieval metrics they are different *galleries*: recall@10 among 20
candidates is easier than among 40, whatever the model. ``compare_runs`` flags the different query sets
and marks those deltas unpaired; this module says what differs (ratios, held-out groups, gallery sizes)
and gives the fair comparison: both models evaluated on the groups that *neither* trained on, one
gallery, paired by query, so :func:`cliptune.report.compare.metric_deltas` gives real verdicts.
``compare_runs(..., heldout=True)`` (``cliptune compare --heldout``) runs it for every run compared.

Example:
    >>> ev_a, ev_b = shared_heldout_eval("runs/split80", "runs/split60")  # doctest: +SKIP
    >>> deltas, flags = metric_deltas(ev_a, ev_b)  # doctest: +SKIP
    >>> flags  # doctest: +SKIP
    []
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cliptune.config import load_config
from cliptune.report.rundata import ReportError
from cliptune.rundir import RunDir, read_json

__all__ = [
    "SHARED_SPLIT",
    "NoSharedHeldoutError",
    "split_differences",
    "shared_heldout_groups",
    "shared_heldout_eval",
]

SHARED_SPLIT = "shared-heldout"
"""Split name of the groups held out from every run (the ``split`` of the eval dicts returned)."""


class NoSharedHeldoutError(ReportError):
    """Every group was trained on by at least one of the runs: no common held-out data to compare on.

    Attributes:
        runs: The run directories.
        trained: Per run, how many groups its train split holds.
    """

    def __init__(self, runs: Sequence[Path], trained: Sequence[int]) -> None:
        self.runs, self.trained = list(runs), list(trained)
        detail = ", ".join(f"{r} trains on {n}" for r, n in zip(self.runs, self.trained, strict=True))
        super().__init__(
            f"no group is held out from every run ({detail} group(s); together they cover every group): "
            "there is no common held-out set to compare them on"
        )


def _splits(run: Path) -> dict[str, list[str]]:
    path = RunDir(run).splits
    if not path.is_file():
        raise ReportError(f"{path}: missing (the run's split is needed to know what it trained on)")
    return {name: [str(g) for g in groups] for name, groups in read_json(path).items()}


def split_differences(run_a: Path | str, run_b: Path | str) -> list[str]:
    """Sentences on what differs between two runs' splits, and why their held-out values do not compare.

    Args:
        run_a, run_b: Run directories (``config.yaml`` and ``splits.json`` are read; ``eval/*.json`` if any).

    Returns:
        One sentence per difference (ratios, groups per split, the groups held out from both, the
        gallery sizes of every eval split both have); empty when the splits are the same.

    Example:
        >>> split_differences("runs/split80", "runs/split60")[0]  # doctest: +SKIP
        'split ratios differ: split80 {train: 0.8, val: 0.2} vs split60 {train: 0.6, val: 0.4}'
    """
    a, b = Path(run_a), Path(run_b)
    sa, sb = _splits(a), _splits(b)
    if {k: sorted(v) for k, v in sa.items()} == {k: sorted(v) for k, v in sb.items()}:
        return []
    ra, rb = (load_config(RunDir(r).config).data.split.ratios for r in (a, b))
    out = []
    if ra != rb:
        out.append(f"split ratios differ: {a.name} {_ratios(ra)} vs {b.name} {_ratios(rb)}")
    counts = ", ".join(f"{s} {len(sa.get(s, []))} vs {len(sb.get(s, []))}" for s in dict.fromkeys([*sa, *sb]))
    out.append(f"groups per split ({a.name} vs {b.name}): {counts}")
    shared = shared_heldout_groups(a, b)
    out.append(
        f"{len(shared)} group(s) are held out from both runs (in neither train split): the only data "
        "on which the two models compare like for like (shared_heldout_eval)"
    )
    for split in ("val", "test"):
        ea, eb = _eval(a, split), _eval(b, split)
        if ea and eb and ea.get("n_rows") != eb.get("n_rows"):
            out.append(
                f"{split} galleries differ: {ea.get('n_rows')} vs {eb.get('n_rows')} rows: recall@k, "
                "precision@k and MRR rank among different numbers of candidates (more is harder), so "
                f"their {split} values differ even for the same model"
            )
    return out


def _ratios(ratios: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in ratios.items()) + "}"


def _eval(run: Path, split: str) -> dict[str, Any] | None:
    path = RunDir(run).eval(split)
    data: dict[str, Any] | None = read_json(path) if path.is_file() else None
    return data


def shared_heldout_groups(*runs: Path | str) -> list[str]:
    """Group ids in no run's train split (sorted): held out from every model.

    Args:
        runs: Two or more run directories (``config.yaml`` and ``splits.json`` are read).

    Raises:
        ReportError: A run without ``splits.json`` or ``config.yaml``, or runs on different catalogues.
    """
    paths = [Path(r) for r in runs]
    if not paths:
        return []
    cats = [load_config(RunDir(r).config).data.catalogue for r in paths]
    for path, cat in zip(paths[1:], cats[1:], strict=True):
        if cats[0] is None or cat is None or Path(cats[0]).resolve() != Path(cat).resolve():
            raise ReportError(
                f"{paths[0]} and {path} trained on different catalogues ({cats[0]} vs {cat}): no shared groups"
            )
    splits = [_splits(p) for p in paths]
    every = {g for s in splits for groups in s.values() for g in groups}
    trained = {g for s in splits for g in s.get("train", [])}
    return sorted(every - trained)


def shared_heldout_eval(
    *runs: Path | str, bootstrap: int | None = None, progress: bool = False
) -> list[dict[str, Any]]:
    """Evaluate every run's model on the groups held out from all of them: one gallery, the same queries.

    All use the first run's ``eval`` settings (k, relevance, bootstrap, seed), so the dicts pair by query
    id and :func:`cliptune.report.compare.metric_deltas` gives paired verdicts.

    Args:
        runs: Two or more run directories trained on the same catalogue.
        bootstrap: Override of ``eval.bootstrap``.
        progress: Progress bars.

    Returns:
        One ``eval/<split>.json``-shaped dict per run, in order, with ``split`` = :data:`SHARED_SPLIT`
        (write them with ``cliptune.evaluation.run.write_eval(ev, out_dir=...)``).

    Raises:
        NoSharedHeldoutError: Every group is in some run's train split.
        ReportError: See :func:`shared_heldout_groups`.
    """
    from cliptune.data.prepare import PreparedData, prepare_data
    from cliptune.data.splits import group_ids
    from cliptune.evaluation.loss import loss_settings
    from cliptune.evaluation.split import evaluate_split
    from cliptune.models.factory import load_model

    paths = [Path(r) for r in runs]
    groups = shared_heldout_groups(*paths)
    if not groups:
        raise NoSharedHeldoutError(paths, [len(_splits(p).get("train", [])) for p in paths])
    cfg = load_config(RunDir(paths[0]).config)
    data = prepare_data(cfg.data, paths[0], progress=progress)
    held = group_ids(data.rows, cfg.data.group_column).isin(set(groups)).to_numpy()
    rows = data.rows.assign(split=[SHARED_SPLIT if h else "other" for h in held])
    shared = PreparedData(data.catalogue, rows, {SHARED_SPLIT: groups}, data.check)
    out = []
    for run in paths:
        model = load_model(run)
        out.append(
            evaluate_split(
                model,
                shared,
                SHARED_SPLIT,
                ks=cfg.eval.k,
                relevant=cfg.eval.relevant,
                bootstrap=cfg.eval.bootstrap if bootstrap is None else bootstrap,
                confidence=cfg.eval.confidence,
                seed=cfg.eval.seed,
                text_column=cfg.data.text_column,
                group_column=cfg.data.group_column,
                cache_dir=cfg.model.cache_dir,
                precision=cfg.model.embed_precision,
                progress=progress,
                loss=loss_settings(
                    load_config(RunDir(run).config), model.source, model.backbone.similarity_init
                ),
            )
        )
    return out
