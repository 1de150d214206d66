"""Epoch time of the retrieval task with the feature cache vs running the frozen towers every step.

Both variants train the same thing: the projection heads of the embedded backbone (EfficientNet-Lite0 +
all-MiniLM-L6-v2, towers frozen) under ``InfoNCELoss`` with a plain AdamW loop, from the same initial
weights, on the same shuffled batches of a rendered fashion catalogue. Only where the tower features come
from differs:

- cached: the features are computed once into a ``FeatureCache`` (``embed_images`` / ``embed_texts``, as
  ``cliptune train`` does when the towers are frozen), held on the training device, and every step
  indexes them;
- recomputed: every step decodes its images (``load_image``) and preprocesses and tokenises them in a
  ``DataLoader`` (``--workers`` processes), then runs both towers forward under ``no_grad`` with the same
  precision as the cache. ``no_grad`` is the cheapest way to run them, so the ratio is a lower bound.

Each variant first runs ``--warmup`` untimed epochs. The cache fill (and a reload of every feature from
disk, all hits) is a one-off cost, reported apart. The mean loss of each variant's first timed epoch is
printed as a check that both trained on the same features and batches (bf16 towers may differ in the last
bits between batch sizes, so the two agree closely, not always exactly).

Usage:
    python benchmarks/bench_epoch_cache.py --n 128
    python benchmarks/bench_epoch_cache.py --n 2000 --batch 256 --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cliptune.data.catalogue import read_catalogue
from cliptune.data.images import load_image
from cliptune.data.synthetic import render_fashion
from cliptune.losses import InfoNCELoss
from cliptune.models.backbone import Backbone
from cliptune.models.cache import FeatureCache
from cliptune.models.embed import embed_images, embed_texts, resolve_precision
from cliptune.models.factory import load_backbone
from cliptune.train.tasks.retrieval import RetrievalModel


class _Pairs(Dataset):
    """(image path, caption) pairs; decoding happens in the collate function, i.e. in the workers."""

    def __init__(self, paths: list[Path], texts: list[str]) -> None:
        self.paths, self.texts = paths, texts

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, str]:
        return self.paths[i], self.texts[i]


class _DecodeCollate:
    """Decode, preprocess and tokenise a batch, as the uncached training path does per step."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def __call__(self, items: list[tuple[Path, str]]) -> dict[str, Tensor]:
        images = [load_image(path) for path, _ in items]
        tokens = self.backbone.tokenize([text for _, text in items])  # (B, T) each
        return {"pixel_values": self.backbone.preprocess(images), **tokens}  # (B, 3, H, W)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch(
    model: RetrievalModel,
    batches: Iterator[dict[str, Tensor]],
    lr: float,
    device: torch.device,
) -> tuple[float, float]:
    """Train one epoch with a fresh AdamW; returns (seconds, mean loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    total, steps = torch.zeros((), device=device), 0
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    _sync(device)
    seconds = time.perf_counter() - t0
    return seconds, float(total) / max(steps, 1)


def _cached_batches(
    images: Tensor, texts: Tensor, order: Tensor, batch: int, device: torch.device
) -> Iterator[dict[str, Tensor]]:
    for start in range(0, len(order), batch):
        idx = order[start : start + batch].to(device)
        yield {
            "image_features": images[idx],  # (B, Fi), already on the device
            "text_features": texts[idx],  # (B, Ft)
        }


def _recomputed_batches(
    backbone: Backbone, loader: DataLoader, precision: str, device: torch.device
) -> Iterator[dict[str, Tensor]]:
    for raw in loader:
        raw = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        ):
            image = backbone.image_features(raw["pixel_values"])  # (B, Fi)
            text = backbone.text_features(raw["input_ids"], raw.get("attention_mask"))  # (B, Ft)
        yield {"image_features": image.float(), "text_features": text.float()}


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="catalogue photos (= training pairs)")
    parser.add_argument("--batch", type=int, default=64, help="training batch size")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the image tower")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes for decoding")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per variant first")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="tower forward")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        t_render, root = _timed(lambda: render_fashion(Path(tmp) / "fashion", n=args.n, seed=args.seed))
        cat = read_catalogue(root)
        paths = [cat.image_path(f) for f in cat.rows["file_name"]]
        texts = cat.rows["text"].astype(str).tolist()
        t_load, backbone = _timed(lambda: load_backbone("embedded", image_size=args.image_size).to(device))
        assert backbone.features_frozen, "the embedded backbone loads with frozen towers"
        model = RetrievalModel(backbone, InfoNCELoss(temperature=0.07, learn_temperature=True)).to(device)
        model.train()  # heads train; Backbone.train keeps the frozen towers in eval mode
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        cache = FeatureCache(Path(tmp) / "cache", backbone.identity())

        def fill() -> tuple[Tensor, Tensor]:
            image_feats = embed_images(
                paths, cache=cache, load=load_image, preprocess=backbone.preprocess,
                forward=backbone.image_features, precision=precision, num_workers=args.workers,
                device=device, progress=False,
            )  # fmt: skip
            text_feats = embed_texts(
                texts, cache=cache, tokenize=backbone.tokenize, forward=backbone.text_features,
                precision=precision, device=device, progress=False,
            )  # fmt: skip
            _sync(device)
            return image_feats, text_feats  # (N, Fi), (N, Ft) on CPU

        t_fill, _ = _timed(fill)
        t_reload, (image_feats, text_feats) = _timed(fill)  # every key is a hit now
        # the cached features are held where training runs (a few MB): each step only indexes them
        image_feats, text_feats = image_feats.to(device), text_feats.to(device)

        loader_gen = torch.Generator()
        order_now: list[int] = list(range(args.n))  # the loader's sampler, reordered in place per epoch
        loader = DataLoader(
            _Pairs(paths, texts),
            batch_size=args.batch,
            sampler=order_now,
            num_workers=args.workers,
            collate_fn=_DecodeCollate(backbone),
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        )
        cached_s, recomputed_s, cached_loss, recomputed_loss = [], [], [], []
        for r in range(-args.warmup, args.repeats):  # negative r: warm-up epochs, not timed
            order = torch.randperm(args.n, generator=loader_gen.manual_seed(args.seed + r))  # (N,)
            order_now[:] = order.tolist()  # the same batches for both variants
            for variant in ("cached", "recomputed"):
                with torch.no_grad():  # same initial weights for every epoch of both variants
                    for n, p in model.named_parameters():
                        if p.requires_grad:
                            p.copy_(start[n])
                if variant == "cached":
                    s, loss = _epoch(
                        model,
                        _cached_batches(image_feats, text_feats, order, args.batch, device),
                        args.lr,
                        device,
                    )
                    if r >= 0:
                        cached_s.append(s)
                        cached_loss.append(loss)
                else:
                    s, loss = _epoch(
                        model, _recomputed_batches(backbone, loader, precision, device), args.lr, device
                    )
                    if r >= 0:
                        recomputed_s.append(s)
                        recomputed_loss.append(loss)

    steps = -(-args.n // args.batch)
    cached, recomputed = statistics.median(cached_s), statistics.median(recomputed_s)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"embedded backbone, image {args.image_size}px, fashion n={args.n}, batch {args.batch} ({steps} steps/epoch), "
        f"{where}, tower precision {precision}, workers {args.workers}, torch {torch.__version__}"
    )
    print(f"one-off: render {t_render:.2f} s, load backbone {t_load:.2f} s, cache fill {t_fill:.2f} s "
          f"({args.n / t_fill:.0f} pairs/s), reload from cache (all hits) {t_reload:.2f} s")  # fmt: skip
    print(f"{'variant':<32} {'epoch s (median)':>17} {'pairs/s':>9} {'mean loss':>10}")
    for name, seconds, losses in (
        ("cached features", cached, cached_loss),
        ("towers recomputed every step", recomputed, recomputed_loss),
    ):
        print(f"{name:<32} {seconds:>17.4f} {args.n / seconds:>9.0f} {losses[0]:>10.4f}")
    ratio = recomputed / cached
    print(f"epoch speed-up with the cache: {ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'NOT met'}); "
          f"runs: cached {[round(s, 4) for s in cached_s]}, recomputed {[round(s, 3) for s in recomputed_s]}")  # fmt: skip


if __name__ == "__main__":
    main()
