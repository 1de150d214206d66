"""``cliptune sweep``: hyper-parameter search with Optuna, one ordinary run directory per trial.

Each trial samples every ``sweep.space`` entry, applies the values as ``--set`` overrides on the sweep's
config (validated like any config: an invalid combination fails that trial with the config error, not the
sweep), trains ``runs/<name>/trial-0003`` with :func:`cliptune.train.run.train`, reports the objective after
every epoch (the median pruner stops unpromising trials) and returns the objective at the run's best epoch
(``summary.json``). The study lives in an RDB storage, SQLite at ``runs/<name>/sweep.db`` by default: a
killed sweep resumes where it stopped, and several machines given one shared URL work on one study.

Example:
    >>> result = run_sweep(load_config("sweep.yaml"), runs_root=Path("runs"), trials=20)  # doctest: +SKIP
    >>> result.best.run_dir  # doctest: +SKIP
    'runs/fashion-sweep/trial-0007'
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from cliptune.config import Config, ConfigError, SweepParam, dump_config, load_config, save_config
from cliptune.errors import CliptuneError
from cliptune.rundir import RunDir, clean_stale_temps, read_summary, write_text_atomic
from cliptune.train.errors import TrainingError
from cliptune.train.run import train

__all__ = [
    "SweepError",
    "MissingSweepNameError",
    "TrialRunExistsError",
    "StudyDirectionMismatchError",
    "StudyConfigMismatchError",
    "SweepResult",
    "TrialRecord",
    "run_sweep",
    "default_storage",
]

HEARTBEAT_SECONDS = 60
"""A running trial writes a heartbeat this often; one silent for GRACE_SECONDS is failed and retried."""
GRACE_SECONDS = 300
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}
_NOT_COMPARED = ("name", "sweep.trials", "sweep.storage")  # may change when a sweep is resumed


class SweepError(CliptuneError, RuntimeError):
    """The sweep itself cannot run (not one trial): no name, empty space, another study's config, ..."""


class MissingSweepNameError(SweepError):
    """The sweep has no name (``name:`` in the config), so it has no study and no sweep folder."""

    def __init__(self) -> None:
        super().__init__("the sweep has no name: set `name:` in the config")


class TrialRunExistsError(SweepError):
    """A trial's run directory already holds a run the study has no record of (a deleted or other sweep.db).

    Attributes:
        run_dir: The trial's run directory (move it away, or name the sweep otherwise).
        study: The study name.
    """

    def __init__(self, run_dir: Path, study: str) -> None:
        self.run_dir, self.study = run_dir, study
        super().__init__(
            f"{run_dir} already holds a run that study '{study}' has no record of (a deleted or other "
            "sweep.db?): move it away"
        )


class StudyDirectionMismatchError(SweepError):
    """A study of this name exists in the storage but optimises in the other direction.

    Attributes:
        study: The study name.
        storage: The storage URL (password masked).
        stored: The study's direction (``maximize`` / ``minimize``).
        configured: ``sweep.direction``.
    """

    def __init__(self, study: str, storage: str, stored: str, configured: str) -> None:
        self.study, self.storage, self.stored, self.configured = study, storage, stored, configured
        super().__init__(
            f"study '{study}' in {storage} maximises/minimises differently ({stored} vs sweep.direction "
            f"{configured})"
        )


class StudyConfigMismatchError(SweepError):
    """A study of this name was started with another config: its trials would not be comparable.

    Attributes:
        study: The study name.
        storage: The storage URL (password masked).
        differences: Each differing config path -> (stored value, current value).
    """

    def __init__(self, study: str, storage: str, differences: dict[str, tuple[Any, Any]]) -> None:
        self.study, self.storage, self.differences = study, storage, differences
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(differences.items())[:5])
        super().__init__(
            f"study '{study}' in {storage} was started with another config ({shown}): trials would not be "
            "comparable; resume with the same config (sweep.trials may change)"
        )


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the leaderboard shows it.

    Attributes:
        number: Optuna's trial number (``trial-0003`` is number 3).
        state: ``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING`` or ``WAITING``.
        value: The objective (best epoch for a complete trial, last reported epoch for a pruned one).
        params: Sampled values by config path.
        run_dir: The trial's run directory (``<name>/failed/trial-NNNN`` for a failed one), if any.
        best_epoch: The run's best epoch (``summary.json``).
        error: Why a trial failed (the config error, the training error, "interrupted ...").
        retry_of: The interrupted trial this one re-runs with the same parameters.
        seconds: Wall-clock duration.
        note: One line for the leaderboard: the error, "pruned after epoch N", or "re-run of trial N".
    """

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    run_dir: str | None
    best_epoch: int | None
    error: str | None
    retry_of: int | None
    seconds: float | None
    note: str


@dataclass(frozen=True)
class SweepResult:
    """What a sweep call leaves: its trials ranked, the best one, parameter importances and the files.

    Attributes:
        name: Study (and sweep folder) name.
        storage: Storage URL with any password masked.
        objective, direction: What was optimised.
        target: ``sweep.trials``: finished (complete or pruned) trials the sweep aims for.
        params: The searched config paths, in ``sweep.space`` order.
        trials: Every trial of the study, best first (complete by value, then pruned, failed, running).
        best: The best complete trial, or None.
        importances: fANOVA importance per varying parameter (sums to 1), or None (``importance_note``).
        importance_note: Why importances are missing, or the method used.
        json_path, md_path: ``runs/<name>/sweep.json`` and ``sweep.md``.
    """

    name: str
    storage: str
    objective: str
    direction: str
    target: int
    params: list[str]
    trials: list[TrialRecord]
    best: TrialRecord | None
    importances: dict[str, float] | None
    importance_note: str
    json_path: Path
    md_path: Path


def default_storage(runs_root: Path, name: str) -> str:
    """``sqlite:///<abs runs_root>/<name>/sweep.db``: the study sits beside its trials' run directories."""
    return f"sqlite:///{(Path(runs_root) / name / 'sweep.db').resolve()}"


def run_sweep(
    cfg: Config,
    *,
    runs_root: Path,
    trials: int | None = None,
    storage: str | None = None,
    quiet: bool = True,
) -> SweepResult:
    """Run (or resume) the Optuna study ``cfg.name`` until ``trials`` trials have finished.

    Trials that finished earlier (complete or pruned) count toward ``trials``; failed ones do not, so
    calling again after failures runs more. On start, this machine's trials whose process died (a
    killed sweep) are marked failed, their run directories moved to ``<name>/failed/``, and each is
    re-run once with the same parameters in a new trial; trials of other machines are failed the same
    way when their heartbeat stops for ``GRACE_SECONDS``. The sampler (TPE) is seeded with
    ``sweep.seed`` plus the number of trials already in the study, so a resumed sweep does not repeat
    the first points.

    Args:
        cfg: The validated config; ``cfg.name`` names the study and ``runs_root/<name>``; ``cfg.sweep``
            holds the objective, direction, space, pruner and seed.
        runs_root: Parent of the sweep folder.
        trials: Target number of finished trials (default ``sweep.trials``).
        storage: Optuna RDB URL (default ``sweep.storage``, else :func:`default_storage`); a shared
            PostgreSQL/MySQL URL lets several machines work on one study.
        quiet: No progress bars and only Optuna's errors.

    Returns:
        The :class:`SweepResult`; ``sweep.json`` and ``sweep.md`` are written in ``runs_root/<name>``.

    Raises:
        MissingSweepNameError: ``cfg.name`` is not set.
        StudyDirectionMismatchError: A study of that name optimises in the other direction.
        StudyConfigMismatchError: A study of that name was started with another config.
        TrialRunExistsError: A trial's run directory exists without a record in the study.
        SweepError: An empty space, a path that is not a config field, an objective that is not logged.
        KeyboardInterrupt: Ctrl-C; the trial is marked failed and re-run by the next call.
    """
    name, sweep = cfg.name, cfg.sweep
    if not name:
        raise MissingSweepNameError()
    if not sweep.space:
        raise SweepError("sweep.space is empty: give at least one config path to search")
    target = sweep.trials if trials is None else trials
    if target < 1:
        raise SweepError(f"trials must be >= 1, got {target}")
    sweep_dir = Path(runs_root) / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # Checked under a private name first: a rejected config must not replace the one running trials read.
    candidate = save_config(cfg, sweep_dir / f".sweep-config-{os.getpid()}.yaml")
    url = storage or sweep.storage or default_storage(runs_root, name)
    with _optuna_quiet(quiet), _removed_at_exit(candidate):
        _check_space(candidate, sweep.space)
        rdb = RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=_retry_once,
        )
        study = optuna.create_study(
            study_name=name, storage=rdb, direction=sweep.direction, load_if_exists=True
        )
        _check_study(study, cfg, url)
        base_yaml = candidate.replace(sweep_dir / "sweep-config.yaml")
        _recover(study, rdb, sweep_dir)
        study.sampler = optuna.samplers.TPESampler(seed=sweep.seed + len(study.get_trials(deepcopy=False)))
        study.pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=2)
            if sweep.pruner == "median"
            else optuna.pruners.NopPruner()
        )
        remaining = target - len(study.get_trials(deepcopy=False, states=_FINISHED))
        if remaining > 0:
            objective = _Objective(base_yaml, cfg, name, Path(runs_root), quiet)
            # Other machines may finish trials meanwhile: stop when the study as a whole reaches the target.
            done = optuna.study.MaxTrialsCallback(target, states=_FINISHED)
            study.optimize(
                objective, n_trials=remaining, catch=(ConfigError, TrainingError), callbacks=[done]
            )
        _park_failed(study.get_trials(deepcopy=False), sweep_dir)
        return _leaderboard(study, cfg, name, target, _redact(url), sweep_dir)


class _Objective:
    """One trial: sample, override, validate, train with per-epoch reports, read the best value."""

    def __init__(self, base_yaml: Path, cfg: Config, name: str, runs_root: Path, quiet: bool) -> None:
        self.base_yaml, self.sweep, self.name = base_yaml, cfg.sweep, name
        self.runs_root, self.quiet = runs_root, quiet

    def __call__(self, trial: Trial) -> float:
        # Who runs the trial: a later call on this host fails it if this process dies.
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {path: _suggest(trial, path, spec) for path, spec in self.sweep.space.items()}
        overrides = [f"{path}={_yaml_text(value)}" for path, value in params.items()]
        trial.set_user_attr("overrides", overrides)
        run_name = _run_name(self.name, trial.number)
        try:
            cfg = load_config(self.base_yaml, [*overrides, f"name={run_name}"])
        except ConfigError as exc:
            trial.set_user_attr("error", str(exc).replace(str(self.base_yaml), "the sweep config"))
            raise
        run_dir = self.runs_root / run_name
        if RunDir(run_dir).metrics.exists():
            raise TrialRunExistsError(run_dir, self.name)
        try:
            train(cfg, runs_root=self.runs_root, quiet=self.quiet, on_epoch=self._reporter(trial, run_dir))
        except TrainingError as exc:
            trial.set_user_attr("error", str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C / SIGTERM)")
            trial.set_user_attr("interrupted", True)
            raise
        summary = read_summary(run_dir)
        trial.set_user_attr("best_epoch", summary.get("best_epoch"))
        return _objective_value(summary.get("best") or {}, self.sweep.objective, RunDir(run_dir).summary)

    def _reporter(self, trial: Trial, run_dir: Path) -> Callable[[dict[str, Any]], None]:
        def report(record: dict[str, Any]) -> None:
            epoch = int(record["epoch"])
            value = _objective_value(record, self.sweep.objective, RunDir(run_dir).metrics)
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_after_epoch", epoch)
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.sweep.objective} = {value:.4g}")

        return report


def _suggest(trial: Trial, path: str, spec: SweepParam) -> Any:
    if spec.type == "float":
        low, high = _bounds(spec)
        return trial.suggest_float(path, low, high, log=spec.log)
    if spec.type == "int":
        low, high = _bounds(spec)
        return trial.suggest_int(path, int(low), int(high), log=spec.log)
    choices = list(spec.choices or [])
    if all(c is None or isinstance(c, bool | int | float | str) for c in choices):
        return trial.suggest_categorical(path, choices)
    # Optuna stores only scalars: a dict or list choice ({train: 0.8, val: 0.2}) is searched as its YAML text.
    return yaml.safe_load(trial.suggest_categorical(path, [_yaml_text(c) for c in choices]))


def _bounds(spec: SweepParam) -> tuple[float, float]:
    """A float or int parameter's ``(low, high)``; :class:`SweepParam` validation guarantees both."""
    assert spec.low is not None and spec.high is not None
    return float(spec.low), float(spec.high)


def _yaml_text(value: Any) -> str:
    """A value as ``--set`` text that parses back to exactly it (PyYAML reads ``1e-05`` as a string)."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip().removesuffix("...").strip()


def _run_name(name: str, number: int) -> str:
    return f"{name}/trial-{number:04d}"


def _objective_value(values: dict[str, Any], objective: str, source: Path) -> float:
    if objective not in values:
        logged = ", ".join(sorted(k for k in values if "/" in k))
        raise SweepError(f"sweep.objective '{objective}' is not in {source}; logged values: {logged}")
    return float(values[objective])


def _check_space(base_yaml: Path, space: dict[str, SweepParam]) -> None:
    """A path that is not a config field would fail every trial: stop before the first one."""
    for path, spec in space.items():
        if spec.type == "int" and not all(float(bound).is_integer() for bound in _bounds(spec)):
            raise SweepError(
                f"sweep.space.{path}: an int parameter needs integer bounds, got {spec.low}, {spec.high}"
            )
        try:
            load_config(base_yaml, [f"{path}=null"])
        except ConfigError as exc:
            unknown = [e for e in exc.errors if "unknown key" in e]
            if unknown:
                raise SweepError(f"sweep.space.{path} is not a config field: {unknown[0]}") from None


def _check_study(study: optuna.Study, cfg: Config, url: str) -> None:
    stored_direction = study.direction.name.lower()
    if stored_direction != cfg.sweep.direction:
        raise StudyDirectionMismatchError(
            study.study_name, _redact(url), stored_direction, cfg.sweep.direction
        )
    current = _flatten(yaml.safe_load(dump_config(cfg)))
    current = {k: v for k, v in current.items() if k not in _NOT_COMPARED}
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", current)
        return
    differ = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
    if differ:
        differences = {k: (stored.get(k), current.get(k)) for k in differ}
        raise StudyConfigMismatchError(study.study_name, _redact(url), differences)


def _flatten(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        return {prefix.rstrip("."): raw}
    return {k: v for key, value in raw.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def _recover(study: optuna.Study, storage: RDBStorage, sweep_dir: Path) -> None:
    """Fail this host's trials whose process died, re-run each once, move their run directories aside."""
    study_id = storage.get_study_id_from_name(study.study_name)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(int(pid)):
            continue  # another machine's trial: its heartbeat decides (optuna's fail_stale_trials)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(
            trial_id, "error", f"interrupted: process {pid} on {host} ended mid-trial"
        )
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("interrupted"):
            _retry_once(study, t)
    _park_failed(study.get_trials(deepcopy=False), sweep_dir)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has started no trial yet: the pid was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _retry_once(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue an interrupted trial's parameters once; a retry is not retried (an OOM kill would loop)."""
    trials = study.get_trials(deepcopy=False)
    if trial.user_attrs.get("retry_of") is not None or any(
        t.user_attrs.get("retry_of") == trial.number for t in trials
    ):
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def _park_failed(trials: list[FrozenTrial], sweep_dir: Path) -> None:
    """Failed trials' run directories leave the ``trial-*`` glob (``compare``) for ``failed/``.

    A killed trial is never resumed, so nothing else would delete what its interrupted writes left (a
    whole hidden ``.model.tmp-<hex>`` folder of weights): those go before the folder moves.
    """
    for t in trials:
        run_dir = sweep_dir / f"trial-{t.number:04d}"
        if t.state == TrialState.FAIL and run_dir.is_dir():
            clean_stale_temps(run_dir)
            (sweep_dir / "failed").mkdir(exist_ok=True)
            dest = sweep_dir / "failed" / run_dir.name
            if dest.exists():
                dest = dest.with_name(f"{run_dir.name}-{len(list(dest.parent.iterdir()))}")
            run_dir.rename(dest)


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


@contextmanager
def _removed_at_exit(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # already renamed when all went well


@contextmanager
def _optuna_quiet(quiet: bool) -> Iterator[None]:
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR if quiet else optuna.logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(old)


def _record(t: FrozenTrial, sweep_dir: Path) -> TrialRecord:
    name = f"trial-{t.number:04d}"
    run_dir = next((d for d in (sweep_dir / name, sweep_dir / "failed" / name) if d.is_dir()), None)
    seconds = t.duration.total_seconds() if t.duration is not None else None
    value = t.value if t.value is not None or t.state != TrialState.PRUNED else _last(t)
    error, retry_of, pruned = (t.user_attrs.get(k) for k in ("error", "retry_of", "pruned_after_epoch"))
    note = _note(error, pruned, retry_of)
    return TrialRecord(
        t.number,
        t.state.name,
        value,
        dict(t.params),
        str(run_dir) if run_dir else None,
        t.user_attrs.get("best_epoch"),
        error,
        retry_of,
        seconds,
        note,
    )


def _note(error: str | None, pruned_after: int | None, retry_of: int | None) -> str:
    """The leaderboard's one-line note: the error's first line, the pruning epoch, or the retried trial."""
    if error:
        return error.splitlines()[0] + (" ..." if "\n" in error else "")
    if pruned_after is not None:
        return f"pruned after epoch {pruned_after}"
    return f"re-run of trial {retry_of}" if retry_of is not None else ""


def _last(t: FrozenTrial) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def _leaderboard(
    study: optuna.Study, cfg: Config, name: str, target: int, url: str, sweep_dir: Path
) -> SweepResult:
    sign = -1.0 if cfg.sweep.direction == "maximize" else 1.0
    records = sorted(
        (_record(t, sweep_dir) for t in study.get_trials(deepcopy=False)),
        key=lambda r: (
            _STATE_ORDER.get(r.state, 9),
            sign * r.value if r.value is not None else math.inf,
            r.number,
        ),
    )
    best = next((r for r in records if r.state == "COMPLETE"), None)
    importances, note = _importances(study, cfg.sweep.seed)
    result = SweepResult(
        name,
        url,
        cfg.sweep.objective,
        cfg.sweep.direction,
        target,
        list(cfg.sweep.space),
        records,
        best,
        importances,
        note,
        sweep_dir / "sweep.json",
        sweep_dir / "sweep.md",
    )
    data = {k: v for k, v in asdict(result).items() if k not in ("json_path", "md_path")}
    write_text_atomic(result.json_path, json.dumps(data, indent=2, default=str))
    write_text_atomic(result.md_path, _markdown(result, sweep_dir))
    return result


def _importances(study: optuna.Study, seed: int) -> tuple[dict[str, float] | None, str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"needs at least 2 complete trials, has {len(complete)}"
    names = sorted({p for t in complete for p in t.params})
    varying = [
        p
        for p in names
        if all(p in t.params for t in complete) and len({repr(t.params[p]) for t in complete}) > 1
    ]
    if not varying:
        return None, "no parameter varies across the complete trials"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
    except (ImportError, RuntimeError, ValueError) as exc:
        return None, f"not computed: {exc}"
    return {k: float(v) for k, v in found.items()}, f"fANOVA over {len(complete)} complete trials"


def _markdown(result: SweepResult, sweep_dir: Path) -> str:
    counts = {s: sum(r.state == s for r in result.trials) for s in _STATE_ORDER}
    params = result.params
    lines = [
        f"# Sweep {result.name}",
        "",
        f"Objective `{result.objective}` ({result.direction}, value at each run's best epoch); target "
        f"{result.target} finished trials; {', '.join(f'{n} {s.lower()}' for s, n in counts.items() if n)}. "
        f"Storage: `{result.storage}`.",
        "",
    ]
    if result.best is not None:
        b = result.best
        lines += [
            f"**Best: trial {b.number}**, {result.objective} = {b.value:.4g} (epoch {b.best_epoch}), "
            f"run `{b.run_dir}`, " + ", ".join(f"`{k}` = {_short(v)}" for k, v in b.params.items()),
            "",
        ]
    lines += [
        "| rank | trial | state | " + " | ".join([result.objective, *params]) + " | run | note |",
        "|" + " --- |" * (5 + len(params) + 1),
    ]
    for rank, r in enumerate(result.trials, 1):
        value = f"{r.value:.4g}" if r.value is not None else ""
        cells = [
            str(rank),
            str(r.number),
            r.state,
            value,
            *(_short(r.params.get(p, "")) for p in params),
            f"`{r.run_dir}`" if r.run_dir else "",
            (r.error or r.note).replace("\n", " ").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Parameter importances", ""]
    if result.importances:
        lines += [
            f"{result.importance_note}; importances sum to 1.",
            "",
            "| parameter | importance |",
            "| --- | --- |",
        ]
        lines += [f"| `{k}` | {v:.3f} |" for k, v in result.importances.items()]
    else:
        lines.append(f"None: {result.importance_note}.")
    lines += [
        "",
        f"Full comparison of the trials (curves, eval deltas): `cliptune compare {sweep_dir}/trial-*`",
        "",
    ]
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
