"""``cliptune export --format onnx``: the graphs, what a client needs beside them, and the parity check.

The folder it writes (atomically: a failed check leaves nothing)::

    image.onnx  text.onnx  [head.onnx]    graphs with a dynamic batch axis (and sequence axis for text)
    preprocess.json                       the image preprocessing as data (``export.inputs``), and
                                          ``jpeg_min_side``: the fast-decode bound, or null
    tokenizer.json                        the tokenizers pipeline (not for open_clip backbones)
    export.json                           identity, graphs' inputs/outputs, opset, exporter, parity
    cliptune_onnx.py                      the torch-free reference client (``export.client``)

The parity check runs the folder as a user would (the reference client's preprocessing, tokenizer and
onnxruntime sessions) on a sample of images and captions and compares it with PyTorch
(``embed_images_with`` / ``embed_texts_with`` in fp32, computed afresh rather than read from the feature
cache, which an export never writes; ``SiameseHead`` for the head graph): every row
must reach a cosine of ``min_cosine`` (default 0.9999), else :class:`ParityError` and no folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cliptune.data.catalogue import Catalogue
from cliptune.export import client
from cliptune.export.errors import ExportError, ExportExistsError, ParityError
from cliptune.export.graphs import HeadGraph, ImageGraph, TextGraph
from cliptune.export.inputs import describe_preprocess, write_tokenizer
from cliptune.models.embed import decode_min_side, embed_images_with, embed_texts_with, image_loader
from cliptune.models.factory import LoadedModel
from cliptune.rundir import atomic_folder

__all__ = ["CLIENT_FILE", "FORMAT", "MIN_COSINE", "export_onnx", "parity_numbers", "parity_sample"]

FORMAT = "cliptune-onnx-v1"
MIN_COSINE = 0.9999
CLIENT_FILE = "cliptune_onnx.py"
_EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's 2 GB limit: bigger graphs keep their weights beside them


def export_onnx(
    model: LoadedModel,
    out: Path,
    paths: Sequence[Path],
    texts: Sequence[str],
    *,
    overwrite: bool = False,
    min_cosine: float = MIN_COSINE,
) -> dict[str, Any]:
    """Export ``model`` as ONNX graphs into ``out`` and check them against PyTorch on a sample.

    Args:
        model: From :func:`cliptune.models.factory.load_model`.
        out: The export folder (written atomically).
        paths: Sample images for the parity check (and the tracing example).
        texts: Sample texts (captions) for the parity check.
        overwrite: Replace an existing ``out``.
        min_cosine: The cosine every onnxruntime row must reach against its PyTorch row.

    Returns:
        The manifest written as ``export.json`` (``parity`` holds the numbers).

    Raises:
        ExportExistsError: ``out`` exists and ``overwrite`` is False.
        ExportError: An empty sample, or a graph or preprocessing that cannot be exported (named).
        ParityError: onnxruntime differs from PyTorch; ``out`` is left as it was.
    """
    if out.exists() and not overwrite:
        raise ExportExistsError(str(out))
    if not paths or not texts:
        raise ExportError(f"{model.source}: the parity check needs at least one image and one text")
    backbone, head = model.backbone.eval(), model.head
    # decoded as embed_images_with decodes them for this model (its fast_decode), so parity compares like
    load, _ = image_loader(backbone.preprocess, fast_decode=backbone.fast_decode)
    images = [load(p) for p in paths]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        # the JPEG decode bound of data.fast_decode (None: full decode), which the client replays
        spec = {
            **describe_preprocess(backbone),
            "jpeg_min_side": decode_min_side(backbone.preprocess, backbone.fast_decode),
        }
        (tmp / client.PREPROCESS_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        tokenizer = write_tokenizer(backbone, tmp)
        example_pixels = backbone.preprocess(_two(images))
        example_tokens = backbone.tokenize(_two(list(texts)))
        big = sum(p.numel() * p.element_size() for p in backbone.parameters()) > _EXTERNAL_DATA_BYTES
        exporters = {
            "image": _export(
                ImageGraph(backbone, head), (example_pixels,), ["image_embeds"], tmp / "image.onnx", big
            ),
            "text": _export(
                TextGraph(backbone, head),
                (example_tokens["input_ids"], example_tokens["attention_mask"]),
                ["text_embeds"],
                tmp / "text.onnx",
                big,
            ),
        }
        if head is not None:
            with torch.no_grad():
                feats = (backbone.image_features(example_pixels), backbone.text_features(**example_tokens))
            exporters["head"] = _export(
                HeadGraph(head),
                feats,
                ["image_embeds", "text_embeds", "fused_embeds"],
                tmp / "head.onnx",
                big,
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "model": model.name,
            "source": str(model.source),
            "backbone_kind": backbone.kind,
            "embed_dim": int(backbone.embed_dim if head is None else head.out_dim),
            "siamese": head is not None,
            "fast_decode": backbone.fast_decode,
            "normalized": True,
            "graphs": {name: {"file": f"{name}.onnx"} for name in exporters},
            "exporter": exporters,
            "preprocess": client.PREPROCESS_FILE,
            "tokenizer": tokenizer,
            "client": CLIENT_FILE,
            "versions": {"torch": torch.__version__, **_versions()},
        }
        _write_manifest(tmp, manifest)
        (tmp / CLIENT_FILE).write_text(Path(client.__file__).read_text(encoding="utf-8"), encoding="utf-8")
        embedder = client.Embedder(tmp)
        for name, graph in manifest["graphs"].items():
            graph |= _signature(embedder.sessions[name], tmp / graph["file"])
        manifest["opset"] = _opset(tmp / "image.onnx")
        parity = parity_numbers(model, embedder, paths, images, texts)
        manifest["parity"] = {**parity, "min_cosine_required": min_cosine}
        _write_manifest(tmp, manifest)
        for name, numbers in parity["graphs"].items():
            if not numbers["min_cosine"] >= min_cosine:  # `not >=`: a NaN cosine fails too
                raise ParityError(
                    name, numbers["min_cosine"], numbers["max_abs_diff"], min_cosine, numbers["n"]
                )
    return manifest


def parity_sample(catalogue: Catalogue, n: int) -> tuple[list[Path], list[str]]:
    """``n`` evenly spaced rows of ``catalogue`` (all when it has fewer): their image files and captions.

    Evenly spaced, not the first ``n``: catalogues are often sorted by class, and the check should see several.
    """
    rows = catalogue.rows
    picks = (
        sorted({int(i) for i in np.linspace(0, len(rows) - 1, num=min(n, len(rows)))}) if len(rows) else []
    )
    chosen = rows.iloc[picks]
    paths = [catalogue.image_path(f) for f in chosen["file_name"]]
    return paths, [str(t) for t in chosen[catalogue.text_column]]


def parity_numbers(
    model: LoadedModel,
    embedder: client.Embedder,
    paths: Sequence[Path],
    images: Sequence[Any],
    texts: Sequence[str],
) -> dict[str, Any]:
    """onnxruntime (through the reference client) against PyTorch on the same images and texts.

    Args:
        model: The PyTorch model.
        embedder: The reference client on the export folder.
        paths: Image files, one per row of ``images``.
        images: Those files decoded (``load_image``).
        texts: Texts.

    Returns:
        ``{"graphs": {name: {"n", "min_cosine", "max_abs_diff"}}, "preprocess_max_abs_diff",
        "tokens_equal"}``: the client's pixels against ``backbone.preprocess`` and its token ids
        against ``backbone.tokenize`` (None without a tokenizer file), so a failing graph points at its cause.
    """
    backbone = model.backbone
    pixels = embedder.preprocess(list(images))
    torch_pixels = backbone.preprocess(list(images))
    torch_tokens = {k: v.numpy() for k, v in backbone.tokenize(list(texts)).items()}
    tokens = embedder.tokenize(texts) if embedder.manifest["tokenizer"] is not None else torch_tokens
    graphs = {
        "image": _compare(
            embedder.run_images(pixels),
            embed_images_with(  # a handful of parity images: no decoding workers to start
                model, paths, precision="fp32", progress=False, use_cache=False, num_workers=0, device="cpu"
            ),
        ),
        "text": _compare(
            embedder.run_texts(tokens),
            embed_texts_with(model, texts, precision="fp32", progress=False, use_cache=False, device="cpu"),
        ),
    }
    if model.head is not None:
        n = min(len(images), len(texts))
        with torch.no_grad():
            image_feats = backbone.image_features(torch_pixels[:n])
            text_feats = backbone.text_features(
                **{k: torch.from_numpy(v[:n]) for k, v in torch_tokens.items()}
            )
            ref = model.head(image_feats, text_feats)
        feeds = {"image_features": image_feats.numpy(), "text_features": text_feats.numpy()}
        got = embedder.sessions["head"].run(None, feeds)
        parts = [_compare(g, r) for g, r in zip(got, (ref.image, ref.text, ref.fused), strict=True)]
        graphs["head"] = {
            "n": n,
            "min_cosine": min(p["min_cosine"] for p in parts),
            "max_abs_diff": max(p["max_abs_diff"] for p in parts),
        }
    same_shape = pixels.shape == tuple(torch_pixels.shape)
    return {
        "graphs": graphs,
        "preprocess_max_abs_diff": float(np.abs(pixels - torch_pixels.numpy()).max()) if same_shape else None,
        "tokens_equal": (
            None
            if embedder.manifest["tokenizer"] is None
            else all(np.array_equal(tokens[k], torch_tokens[k]) for k in ("input_ids", "attention_mask"))
        ),
    }


def _compare(got: np.ndarray, ref: Tensor) -> dict[str, Any]:
    """Row cosines and the largest coordinate difference of two (N, D) arrays."""
    want = ref.float().numpy()
    if got.shape != want.shape:
        return {"n": int(want.shape[0]), "min_cosine": float("nan"), "max_abs_diff": float("inf")}
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    cosines = (got * want).sum(axis=1) / np.maximum(norms, 1e-12)
    return {
        "n": int(len(got)),
        "min_cosine": float(cosines.min()),
        "max_abs_diff": float(np.abs(got - want).max()),
    }


def _two(items: list[Any]) -> list[Any]:
    """Two examples to trace with: a batch of one would let the exporter fix the batch axis to 1."""
    return (items * 2)[:2]


def _export(module: nn.Module, args: tuple[Tensor, ...], outputs: list[str], path: Path, big: bool) -> str:
    """Export ``module`` with a dynamic batch (and sequence) axis; returns the exporter that did it.

    torch's dynamo exporter (``torch.export`` + onnxscript) first; the TorchScript exporter only when it
    fails, and the manifest says so with the reason.
    """
    import inspect

    names = list(inspect.signature(module.forward).parameters)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {
        n: ({0: batch, 1: torch.export.Dim.AUTO} if a.ndim == 2 and a.dtype == torch.long else {0: batch})
        for n, a in zip(names, args, strict=True)
    }
    module = module.eval()
    try:
        with _quiet():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=dynamic,
                external_data=big,
                verbose=False,
            )
        _name_sequence_axis(path)
        return "dynamo"
    except Exception as err:  # the dynamo exporter raises many types; the fallback says which
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    axes = {
        n: ({0: "batch", 1: "sequence"} if a.ndim == 2 and a.dtype == torch.long else {0: "batch"})
        for n, a in zip(names, args, strict=True)
    }
    try:
        with _quiet():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=outputs,
                dynamic_axes={**axes, **{o: {0: "batch"} for o in outputs}},
            )
    except Exception as err:
        raise ExportError(
            f"{path.stem} graph: neither ONNX exporter could export it ({reason}; then {err})"
        ) from err
    return f"torchscript (dynamo failed: {reason})"


def _name_sequence_axis(path: Path) -> None:
    """Call the text graph's free sequence axis ``sequence`` (torch.export names an automatic axis ``s53``)."""
    import onnx

    graph_file = onnx.load(str(path), load_external_data=False)
    graph = graph_file.graph
    symbols = {
        dims[1].dim_param
        for value in graph.input
        if len(dims := value.type.tensor_type.shape.dim) == 2 and dims[1].dim_param
    }
    if len(symbols) != 1 or symbols == {"sequence"}:
        return
    (old,) = symbols
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = "sequence"
    onnx.save(graph_file, str(path))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No gradients, and none of the exporters' progress lines, warnings and log records on the console."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _signature(session: Any, file: Path) -> dict[str, Any]:
    def described(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "shape": list(v.shape), "type": v.type} for v in values]

    files = sorted(p.name for p in file.parent.glob(f"{file.name}*"))
    return {
        "inputs": described(session.get_inputs()),
        "outputs": described(session.get_outputs()),
        "files": files,
    }


def _opset(file: Path) -> int:
    import onnx

    graph = onnx.load(str(file), load_external_data=False)
    return int(next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime  # type: ignore[import-untyped]  # onnxruntime ships no type information

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / client.EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
