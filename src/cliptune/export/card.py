"""The model card of a run: a Hugging Face ``README.md`` whose every number comes from the run's files.

A model leaves the run directory through ``cliptune export`` (the card is written beside the graphs, so
offline users get it) and ``cliptune push`` (the card becomes the hub repo's README). Whoever picks the
model up sees what the report showed: the base model, the data, the training config, the test metrics
with their bootstrap intervals and n, the suite verdicts per category, the comparison with a baseline,
and the limitations. Nothing is invented: a file the run lacks makes its section say what is missing.

The YAML front matter is built with huggingface_hub's :class:`~huggingface_hub.ModelCardData` (no
network), so the hub indexes the library, the tags, the base model and the test metrics (``model-index``).
The body is a :class:`~cliptune.report.document.Document` rendered by the report's Markdown renderer,
and its intervals are formatted by the report's :func:`~cliptune.report.build.interval_text`.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from cliptune.errors import CliptuneError
from cliptune.ranking.bootstrap import Interval
from cliptune.report.build import interval_text
from cliptune.report.deltas import metric_deltas
from cliptune.report.diagnostics import WIDE_INTERVAL
from cliptune.report.document import Cell, Document, Paragraph, Section, Table
from cliptune.report.markdown import render_markdown
from cliptune.report.rundata import RunData, load_compared, load_run
from cliptune.rundir import RunDir, is_run, read_json, write_text_atomic

__all__ = ["CARD_FILE", "CardError", "model_card", "write_model_card"]

CARD_FILE = "README.md"
"""The card's file name: what the hub shows as a model repo's page."""

BACKBONE_FILE = "cliptune_backbone.json"
HEADLINE = ("recall@1", "recall@5", "recall@10", "mrr", "ndcg@10")
"""Per direction, the test metrics the card's first table (and the hub's model-index) shows."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CardError(CliptuneError, ValueError):
    """A model card cannot be written for this folder; the message names it and the reason.

    Attributes:
        path: The folder given as a run.
        reason: What is wrong with it.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def model_card(
    run: Path,
    *,
    baseline: Path | None = None,
    onnx: Path | None = None,
    license: str | None = None,  # noqa: A002 (the model-card field's own name)
) -> str:
    """The model card of a run directory, as Markdown with Hugging Face YAML front matter.

    Args:
        run: ``runs/<name>`` (``config.yaml``, ``model/`` and ``metrics.jsonl``).
        baseline: A run directory or a model-evaluation folder (``cliptune eval MODEL --splits-from RUN
            --out FOLDER``, e.g. the zero-shot baseline) to compare with on the shared eval splits. Default:
            ``compare.json`` in ``<run's parent>/compare`` (``cliptune compare``'s default output) or one
            folder up (the demo's layout) when it lists this run as a candidate; else the card says there
            is no comparison.
        onnx: A folder ``cliptune export --format onnx`` wrote, named in the usage section.
        license: The licence id for the front matter (the run records none).

    Returns:
        The card's text (front matter, then the body).

    Raises:
        CardError: ``run`` is not a finished run directory.
        ReportError: A run file cannot be read (the message names the file and line).

    Example:
        >>> print(model_card(Path("runs/demo-finetuned"))[:3])  # doctest: +SKIP
        ---
    """
    run = Path(run)
    if not is_run(run):
        raise CardError(run, "not a run directory (it needs config.yaml and model/)")
    data = load_run(run)
    backbone = _backbone_json(RunDir(run).model)
    comparison = _comparison(data, baseline)
    doc = Document(
        f"{data.name}",
        f"A {data.task} model fine-tuned with cliptune from {data.config.get('model', {}).get('backbone')}; "
        "every number below is read from the run directory's files.",
        [
            _status_section(data),
            _base_section(data, backbone),
            _data_section(data),
            _training_section(data),
            _metrics_section(data),
            _suites_section(data),
            comparison,
            _usage_section(data, onnx),
            _limitations_section(data),
        ],
    )
    return f"---\n{_card_data(data, backbone, license).to_yaml()}\n---\n\n{render_markdown(doc)}"


def write_model_card(
    run: Path,
    out_dir: Path,
    *,
    baseline: Path | None = None,
    onnx: Path | None = None,
    license: str | None = None,  # noqa: A002 (the model-card field's own name)
) -> Path:
    """Write :func:`model_card` as ``out_dir/README.md`` atomically (``out_dir`` is created).

    Args:
        run: The run directory.
        out_dir: Where the card goes (an export folder, or anywhere a user wants the card alone).
        baseline: See :func:`model_card`.
        onnx: See :func:`model_card` (``export`` passes its own output folder).
        license: See :func:`model_card`.

    Returns:
        The card's path.

    Raises:
        CardError: ``run`` is not a finished run directory.
        ReportError: A run file cannot be read.

    Example:
        >>> write_model_card(Path("runs/demo-finetuned"), Path("export/demo"))  # doctest: +SKIP
        PosixPath('export/demo/README.md')
    """
    text = model_card(run, baseline=baseline, onnx=onnx, license=license)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out_dir / CARD_FILE, text)


# ---------------------------------------------------------------- front matter


def base_model_id(spec: object) -> str | None:
    """The backbone spec when it is a hub id (``org/name``, not a local folder), else None.

    The hub links a card's ``base_model`` to that model's page, so only a real hub id may go there.

    Example:
        >>> base_model_id("openai/clip-vit-base-patch32"), base_model_id("embedded")
        ('openai/clip-vit-base-patch32', None)
    """
    text = str(spec or "")
    return text if _HUB_ID.match(text) and not Path(text).exists() else None


def _tags(data: RunData, backbone: dict[str, Any]) -> list[str]:
    spec = f"{backbone.get('kind', '')} {data.config.get('model', {}).get('backbone', '')}".lower()
    tags = ["cliptune", "siglip" if "siglip" in spec else "clip", "image-text-retrieval"]
    return tags + (["siamese"] if data.task == "siamese" else [])


def _card_data(data: RunData, backbone: dict[str, Any], license: str | None) -> ModelCardData:  # noqa: A002
    test = data.evals.get("test", {})
    catalogue = str(test.get("catalogue") or data.catalogue or "unknown")
    results = [
        EvalResult(
            task_type="image-text-retrieval",
            task_name="image-text retrieval",
            dataset_type="imagefolder",
            dataset_name=Path(catalogue).name or catalogue,
            dataset_split="test",
            metric_type=key,
            metric_name=f"{key} (mean of {m.get('n')} queries)",
            metric_value=m["mean"],
        )
        for key, m in _headline(test).items()
    ]
    return ModelCardData(
        model_name=data.name,
        library_name="cliptune",
        tags=_tags(data, backbone),
        base_model=base_model_id(data.config.get("model", {}).get("backbone")),
        license=license,
        eval_results=results or None,
    )


# ---------------------------------------------------------------- sections


def _failed_suites(data: RunData) -> dict[str, list[str]]:
    return {
        str(s.get("suite", name)): [c for c, v in s.get("categories", {}).items() if not v.get("passed")]
        for name, s in data.suites.items()
        if not s.get("passed")
    }


def _status_section(data: RunData) -> Section:
    failed = _failed_suites(data)
    blocks: list[Any] = []
    if failed:
        which = "; ".join(
            f"suite {s}: categories {', '.join(c) or '(none listed)'}" for s, c in failed.items()
        )
        blocks.append(Paragraph(f"This model FAILED its behavioural gate ({which}).", "warn"))
    elif data.suites:
        blocks.append(Paragraph(f"This model passed its behavioural gate ({', '.join(data.suites)}).", "ok"))
    else:
        blocks.append(Paragraph("This model was not gated: the run has no suite/*.json.", "warn"))
    if data.untrained_best:
        blocks.append(
            Paragraph(
                "No trained epoch beat the untrained model on validation: model/ holds the untrained model (epoch 0).",
                "warn",
            )
        )
    return Section("status", "Status", blocks)


def _backbone_json(model: Path) -> dict[str, Any]:
    # A Siamese run keeps the backbone in model/backbone/ beside its head.
    for path in (model / BACKBONE_FILE, model / "backbone" / BACKBONE_FILE):
        if path.is_file():
            value = read_json(path)
            return value if isinstance(value, dict) else {}
    return {}


def _base_section(data: RunData, backbone: dict[str, Any]) -> Section:
    model = data.config.get("model", {})
    rows = [["backbone spec (model.backbone)", str(model.get("backbone"))]]
    hub = base_model_id(model.get("backbone"))
    rows.append(["base model on the hub", hub or "none (a local folder or a registry name)"])
    for key in ("kind", "embed_dim", "model_identity", "features_identity", "trainable_layers", "lora"):
        if key in backbone:
            rows.append([key, str(backbone[key])])
    if (RunDir(data.path).model / "head").is_dir():
        rows.append(
            ["Siamese head", "model/head/ fuses image and text; the identities above are the backbone's"]
        )
    blocks: list[Any] = [Table(["field", "value"], rows, numeric=False)]
    if not backbone:
        blocks.append(Paragraph(f"model/{BACKBONE_FILE} is missing: the saved model's identity is unknown."))
    return Section("base", "Base model", blocks)


def _data_section(data: RunData) -> Section:
    info = data.summary.get("info", {})
    split_rows: dict[str, int] = info.get("split_rows", {})
    splits_file = RunDir(data.path).splits
    groups = {k: len(v) for k, v in read_json(splits_file).items()} if splits_file.is_file() else {}
    blocks: list[Any] = [Paragraph(f"Catalogue: {data.catalogue or 'not recorded in config.yaml'}.")]
    if not groups:
        blocks.append(Paragraph("splits.json is missing: the split's groups are unknown.", "warn"))
    if not split_rows:
        blocks.append(Paragraph("summary.json has no info.split_rows: rows per split are unknown.", "warn"))
    names = list(dict.fromkeys([*groups, *split_rows]))
    rows = [
        [
            name,
            str(groups.get(name, "?")),
            str(split_rows.get(name, "?")),
            str(data.evals[name].get("n_images", "?")) if name in data.evals else "not evaluated",
        ]
        for name in names
    ]
    if names:
        rows.append(["total", str(sum(groups.values()) or "?"), str(sum(split_rows.values()) or "?"), ""])
        blocks.append(
            Table(
                ["split", "groups (splits.json)", "rows (summary.json)", "images (eval/<split>.json)"],
                rows,
                "Splits: a group (data.group_column) is never in two splits",
            )
        )
    rejected = RunDir(data.path).rejected
    if rejected.is_file():
        with rejected.open(newline="", encoding="utf-8") as f:
            n = max(sum(1 for _ in csv.reader(f)) - 1, 0)  # a caption may hold a newline: count records
        blocks.append(Paragraph(f"rejected.csv lists {n} catalogue row(s) left out of training."))
    if _synthetic(data.catalogue):
        blocks.append(
            Paragraph(
                "The catalogue folder holds contact_sheet.png, which cliptune's synthetic generators write: "
                "it is most likely a synthetic catalogue, not real photos.",
                "warn",
            )
        )
    return Section("data", "Data", blocks)


def _synthetic(catalogue: Path | None) -> bool:
    return catalogue is not None and (catalogue / "contact_sheet.png").is_file()


def _training_section(data: RunData) -> Section:
    cfg, s = data.config, data.summary
    model, train, loss = cfg.get("model", {}), cfg.get("train", {}), cfg.get("loss", {})
    rows = [
        ["task", data.task],
        ["trainable layers / LoRA", f"{model.get('trainable_layers')} / {model.get('lora')}"],
        ["loss", f"{loss.get('name')} (temperature {_temperature(loss, s)})"],
        ["epochs trained / configured", f"{data.epochs_trained} / {train.get('epochs')}"],
        ["best epoch (model/)", str(data.best_epoch)],
        ["stop reason", str(s.get("stop_reason", "not finished (no summary.json)"))],
        ["lr / batch size", f"{train.get('lr')} / {train.get('batch_size')}"],
        ["weight decay", str(train.get("weight_decay"))],
        ["scheduler", str(train.get("scheduler"))],
        ["seed", str(train.get("seed"))],
    ]
    blocks: list[Any] = [Table(["setting", "value"], rows, numeric=False)]
    config = RunDir(data.path).config
    text = config.read_text(encoding="utf-8").rstrip("\n")
    blocks.append(
        Paragraph(
            f"<details><summary>config.yaml (the full resolved config)</summary>\n\n```yaml\n{text}\n```\n\n</details>"
        )
    )
    return Section("training", "Training", blocks)


def _temperature(loss: dict[str, Any], summary: dict[str, Any]) -> str:
    # config.yaml's null means "the base model's own": summary.json records the value step 0 used.
    if loss.get("temperature") is not None:
        return str(loss["temperature"])
    start = summary.get("info", {}).get("loss_init", {})
    return f"{start['temperature']:.4g}, {start.get('source')}" if "temperature" in start else "not recorded"


def _headline(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    metrics: dict[str, dict[str, Any]] = ev.get("metrics", {})
    keys = [f"{d}/{m}" for d in ("t2i", "i2t") for m in HEADLINE]
    keys += sorted(k for k in metrics if k.startswith("triplet/"))
    return {k: metrics[k] for k in keys if k in metrics}


def _metric_table(metrics: dict[str, dict[str, Any]], caption: str) -> Table:
    return Table(
        ["metric", "mean [interval] n"], [[k, interval_text(m)] for k, m in metrics.items()], caption
    )


def _metrics_section(data: RunData) -> Section:
    test = data.evals.get("test")
    if test is None:
        others = ", ".join(sorted(data.evals)) or "none"
        text = f"No eval/test.json: the test split was not evaluated (evaluated splits: {others})."
        return Section("metrics", "Test metrics", [Paragraph(text, "warn")])
    conf = float(test.get("confidence", 0.95))
    caption = (
        f"Test split ({test.get('n_rows', '?')} rows, {test.get('n_images', '?')} images): mean "
        f"[{conf:.0%} bootstrap interval over queries, {test.get('bootstrap', '?')} resamples] n=queries"
    )
    blocks: list[Any] = [_metric_table(_headline(test) or test.get("metrics", {}), caption)]
    lines = _markdown_table(_metric_table(test.get("metrics", {}), ""))
    blocks.append(Paragraph(f"<details><summary>Every test metric</summary>\n\n{lines}\n\n</details>"))
    return Section("metrics", "Test metrics", blocks)


def _markdown_table(table: Table) -> str:
    # The report's renderer draws the table; only its lines are kept, for a collapsed <details> block.
    text = render_markdown(Document("", "", [Section("t", "t", [table])]))
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def _suites_section(data: RunData) -> Section:
    if not data.suites:
        return Section(
            "suites", "Behavioural suites", [Paragraph("No suite/*.json: no behavioural suite was run.")]
        )
    blocks: list[Any] = []
    for name, suite in data.suites.items():
        passed = bool(suite.get("passed"))
        blocks.append(
            Paragraph(
                f"Suite {suite.get('suite', name)}: {'PASSED' if passed else 'FAILED'} (k={suite.get('k')}, "
                f"ranked split {suite.get('split', '?')}, {suite.get('n_items', '?')} images).",
                "ok" if passed else "warn",
            )
        )
        rows: list[list[str | Cell]] = []
        for cat, c in suite.get("categories", {}).items():
            metrics, k = c.get("metrics", {}), c.get("k", suite.get("k"))
            rows.append(
                [
                    cat,
                    Cell("pass" if c.get("passed") else "FAIL", "pass" if c.get("passed") else "fail"),
                    str(c.get("n_queries", "")),
                    interval_text(metrics["mrr"]) if "mrr" in metrics else "",
                    interval_text(metrics[f"precision@{k}"]) if f"precision@{k}" in metrics else "",
                    "; ".join(c.get("failures", [])),
                ]
            )
        cols = ["category", "verdict", "queries", "mrr", "precision@k", "failures"]
        blocks.append(Table(cols, rows, f"Suite {suite.get('suite', name)} by category: mean [interval] n"))
    return Section("suites", "Behavioural suites", blocks)


def _comparison(data: RunData, baseline: Path | None) -> Section:
    title = "Comparison with the baseline"
    if baseline is not None:
        base = load_compared(baseline)
        blocks: list[Any] = []
        for split in [s for s in ("test", "val") if s in base.evals and s in data.evals]:
            deltas, flags = metric_deltas(base.evals[split], data.evals[split])
            blocks += [Paragraph(f"{f}.", "warn") for f in flags]
            rows = [_delta_row(d.metric, d.baseline, d.candidate, d.interval, d.verdict) for d in deltas]
            blocks.append(_delta_table(rows, base.name, data.name, split))
        if not blocks:
            blocks.append(Paragraph(f"{baseline} shares no evaluated split (test, val) with this run."))
        return Section("comparison", f"{title} ({base.name})", blocks)
    found = _compare_json(data)
    if found is None:
        return Section("comparison", title, [Paragraph("No baseline comparison in this run directory.")])
    path, compared = found
    summary = compared.get("summary", {}).get(data.name, {})
    blocks = [Paragraph(f"From {path} (baseline {compared.get('baseline')}): {summary.get('sentence', '')}")]
    for split, deltas in compared.get("deltas", {}).get(data.name, {}).items():
        rows = [
            _delta_row(d["metric"], d["baseline"], d["candidate"], d.get("interval"), d["verdict"])
            for d in deltas
        ]
        blocks.append(_delta_table(rows, "baseline", data.name, split))
    return Section("comparison", title, blocks)


def _delta_row(
    metric: str, base: float, cand: float, interval: Interval | dict[str, Any] | None, verdict: str
) -> list[str]:
    # interval: the bootstrap's Interval, or compare.json's dict of it (None: no per-query values)
    bounds = (
        (interval["low"], interval["high"])
        if isinstance(interval, dict)
        else (interval.low, interval.high)
        if interval is not None
        else None
    )
    text = f"{cand - base:+.3f}" + (f" [{bounds[0]:+.3f}, {bounds[1]:+.3f}]" if bounds else "")
    return [metric, f"{base:.4f}", f"{cand:.4f}", text, verdict]


def _delta_table(rows: list[list[str]], base: str, name: str, split: str) -> Table:
    # The headline metrics and the loss; compare.md and compare.json hold every metric.
    shown = [
        r for r in rows if r[0] == "loss" or r[0].startswith("triplet/") or r[0].partition("/")[2] in HEADLINE
    ]
    return Table(["metric", base, name, "delta [interval]", "verdict"], shown, f"{split} split")


def _compare_json(data: RunData) -> tuple[Path, dict[str, Any]] | None:
    # compare's default --out (<runs>/compare), and the demo's (<out>/compare beside <out>/runs)
    me = data.path.resolve()
    for folder in (me.parent, me.parent.parent):
        path = folder / "compare" / "compare.json"
        if not path.is_file():
            continue
        compared = read_json(path)
        runs = [Path(r).resolve() for r in compared.get("runs", [])]
        if me in runs and Path(str(compared.get("baseline"))).resolve() != me:
            return path, compared
    return None


def _usage_section(data: RunData, onnx: Path | None) -> Section:
    code = (
        "```python\n"
        "from huggingface_hub import snapshot_download\n"
        "from cliptune.models.factory import load_model\n"
        "from cliptune.models.embed import embed_images_with, embed_texts_with\n\n"
        'model = load_model(snapshot_download("REPO_ID"))  # or a local copy of the model folder\n'
        'texts = embed_texts_with(model, ["a red summer dress"])  # (N, D), unit length\n'
        "```"
    )
    blocks: list[Any] = [
        Paragraph("The repository holds the run's model/ folder, which cliptune's `load_model` reads:"),
        Paragraph(code),
        Paragraph(
            "Search a catalogue with `cliptune index MODEL_FOLDER --data CATALOGUE --out INDEX` and "
            '`cliptune search INDEX "query"`.'
        ),
    ]
    if onnx is not None:
        files = sorted(p.name for p in Path(onnx).glob("*.onnx"))
        blocks.append(
            Paragraph(
                f"ONNX graphs ({', '.join(files) or 'no .onnx file found'}; under onnx/ in a hub repository, "
                "beside this card in an export folder): they run in onnxruntime without torch; the "
                "preprocessing and tokenizer config a client needs ship with them (docs/export.md)."
            )
        )
    else:
        blocks.append(Paragraph("No ONNX export is included (`cliptune export RUN --format onnx OUT`)."))
    return Section("usage", "How to use", blocks)


def _limitations_section(data: RunData) -> Section:
    items: list[str] = []
    info = data.summary.get("info", {})
    rows, groups = (
        sum(info.get("split_rows", {}).values()),
        sum(info.get("splits", {}).get("groups", {}).values()),
    )
    if rows:
        train_rows = info.get("split_rows", {}).get("train", "?")
        items.append(f"Data size: {rows} rows in {groups} groups in all, {train_rows} of them trained on.")
    test = data.evals.get("test")
    if test is not None:
        head = _headline(test) or test.get("metrics", {})
        widest = max(
            head.items(), key=lambda kv: (kv[1].get("high") or 0) - (kv[1].get("low") or 0), default=None
        )
        if widest is not None and widest[1].get("low") is not None:
            key, m = widest
            width = m["high"] - m["low"]
            wide = f", wider than {WIDE_INTERVAL}: too wide to trust" if width > WIDE_INTERVAL else ""
            items.append(
                f"The test split has n={m.get('n')} queries; the widest headline interval, {key}, spans "
                f"{width:.3f} ({interval_text(m)}){wide}."
            )
    else:
        items.append("The test split was not evaluated: no metric with an interval backs this model.")
    items += [str(w) for w in info.get("splits", {}).get("warnings", [])]
    if _synthetic(data.catalogue):
        items.append("The catalogue is most likely synthetic: real photos may behave differently.")
    if not data.suites:
        items.append("No behavioural suite was run: attribute, colour or negation behaviour is untested.")
    for name, suite in data.suites.items():
        if suite.get("unmeasured"):
            items.append(f"Suite {name} did not measure: {', '.join(suite['unmeasured'])}.")
        if suite.get("skipped"):
            items.append(
                f"Suite {name} skipped {len(suite['skipped'])} quer(ies) with no relevant image ranked."
            )
    for failed, cats in _failed_suites(data).items():
        items.append(f"Suite {failed} failed in: {', '.join(cats) or 'its gate'}.")
    if data.untrained_best:
        items.append("Training did not improve on the base model (best epoch 0).")
    return Section("limitations", "Limitations", [Paragraph("\n".join(f"- {i}" for i in items))])
