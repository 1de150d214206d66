"""Peak memory of one InfoNCE training step with gradient caching vs without, towers trainable.

Each case runs in a fresh Python process (so one case's high-water mark cannot hide another's): it builds a
small random CLIP (every weight trainable), a batch of ``--batch-size`` image-text pairs (random pixels,
captions from a tiny corpus), then takes one step as the loop does (prepared model, forward, backward,
AdamW step) with ``train.grad_cache`` off or with the given chunk size. Reported per case: the loss (the
same in every case: the loss is computed on the whole batch either way), the peak memory of the step, and
the step's wall time.

Memory: on CPU the process's peak resident set (``resource.getrusage(...).ru_maxrss``) after the step, and
its growth over the peak before the step (model, batch, imports), which is what the step itself added; on
CUDA ``torch.cuda.max_memory_allocated`` during the step. (tracemalloc does not see torch's allocations.)

Usage:
    python benchmarks/bench_grad_cache.py                      # 1,024 pairs, chunk 64 vs no cache
    python benchmarks/bench_grad_cache.py --chunks 0 64 256 --hidden 64 --layers 4 --image-size 64
    python benchmarks/bench_grad_cache.py --device cuda --batch-size 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

from cliptune.losses import InfoNCELoss
from cliptune.models.factory import load_backbone
from cliptune.train.grad_cache import GradCache
from cliptune.train.tasks.retrieval import RetrievalModel

CORPUS = ["a photo of a cat", "a red dress with white dots", "a black leather jacket", "ripped blue jeans"]


def _small_clip(path: Path, hidden: int, layers: int, image_size: int) -> Path:
    """A random CLIP of the given size, saved with an image processor and a tiny BPE tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=100, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=16,
    )
    sizes = {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(
        text_config={
            **sizes,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        vision_config={**sizes, "image_size": image_size, "patch_size": 8},
        projection_dim=hidden,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    size = {"height": image_size, "width": image_size}
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _case(args: argparse.Namespace) -> dict[str, float]:
    """One step in this process; its loss, peak memory and time."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = load_backbone(args.model, trainable_layers=-1)
    model = RetrievalModel(backbone, InfoNCELoss(temperature=0.07, learn_temperature=True)).train()
    pixels = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1)
    )
    tokens = backbone.tokenize([CORPUS[i % len(CORPUS)] for i in range(args.batch_size)])
    batch = {k: v.to(device) for k, v in {"pixel_values": pixels, **tokens}.items()}
    accelerator = Accelerator(cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.chunk:
        cache = GradCache(args.chunk, accelerator)
        loss = cache.forward(prepared, batch)["loss"].item()
        cache.backward(prepared)
    else:
        out = prepared(batch)["loss"]
        loss = out.item()
        accelerator.backward(out)
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"loss": loss, "seconds": seconds, "rss_peak_mib": after, "rss_step_mib": after - before}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 64], help="0: no gradient caching")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help=argparse.SUPPRESS)  # set for the per-case child process
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is not None:
        print(json.dumps(_case(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = _small_clip(Path(tmp) / "clip", args.hidden, args.layers, args.image_size)
        n_params = sum(p.numel() for p in CLIPModel.from_pretrained(model).parameters())
        rows = []
        for chunk in args.chunks:
            cmd = [
                sys.executable,
                __file__,
                "--model",
                str(model),
                "--chunk",
                str(chunk),
                "--batch-size",
                str(args.batch_size),
                "--image-size",
                str(args.image_size),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append((chunk, json.loads(proc.stdout.strip().splitlines()[-1])))

    print(
        f"# {args.batch_size} pairs, CLIP hidden {args.hidden} x {args.layers} layers, {args.image_size} px "
        f"images ({n_params / 1e6:.2f} M parameters, all trainable), InfoNCE, one AdamW step, "
        f"{args.device}, {args.threads} thread(s); {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
    cuda = args.device.startswith("cuda")
    head = "| grad cache | loss | step peak above pre-step peak (MiB) | process peak RSS (MiB) |"
    print(head + (" CUDA peak allocated (MiB) |" if cuda else "") + " step time (s) |")
    print("|---|---|---|---|" + ("---|" if cuda else "") + "---|")
    for chunk, r in rows:
        name = f"chunk {chunk}" if chunk else "off"
        extra = f" {r['cuda_peak_mib']:.0f} |" if cuda else ""
        print(
            f"| {name} | {r['loss']:.6f} | {r['rss_step_mib']:.0f} | {r['rss_peak_mib']:.0f} |{extra} "
            f"{r['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
