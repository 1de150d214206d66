"""Samples/s and model FLOPs utilisation of one SigLIP ViT-B/16 fine-tuning step, every weight trainable.

The step is cliptune's own: ``RetrievalModel`` (``HFBackbone`` of a transformers ``SiglipModel``) with
``SigLIPLoss``, forward + backward + AdamW, under bf16 autocast on CUDA (what ``train.precision: auto``
picks there), weights in fp32. The model has ViT-B/16 SigLIP's shapes (224 px images in 16 px patches,
768 wide, 12 layers per tower, 64-token texts, a 32k vocabulary) and random weights: speed does not
depend on the values, and nothing has to be downloaded.

Model FLOPs per step are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward (matrix products and attention; the optimiser's element-wise work is not model FLOPs).
MFU = FLOPs per step / median step time / the GPU's peak dense bf16 tensor FLOP/s. The peak is the
datasheet figure (``PEAK_BF16_TFLOPS``, looked up by device name, or ``--peak-tflops``); the script also
times a large bf16 matrix product on the same GPU and reports the utilisation against that achievable
rate, which is the fairer ceiling.

Prints a short table and, as its last line, one JSON object with every number.

Usage (from the repository root, ``PYTHONPATH=src``):
    python benchmarks/bench_gpu_step.py --batch-size 256 --steps 20            # on a CUDA machine
    python benchmarks/bench_gpu_step.py --tiny --device cpu --steps 2 --batch-size 4   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import SiglipConfig, SiglipModel

from cliptune.losses import SigLIPLoss
from cliptune.models.hf import HFBackbone
from cliptune.train.tasks.retrieval import RetrievalModel

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s, from NVIDIA's datasheets: H200 SXM "BF16 Tensor Core
# 1,979 TFLOPS" and H100 SXM "1,979 TFLOPS" are quoted *with sparsity*, i.e. 989.4 dense (NVIDIA H200
# Tensor Core GPU datasheet, nvidia.com/en-us/data-center/h200; NVIDIA H100 Tensor Core GPU datasheet);
# H200 NVL 1,671 sparse -> 835.5; H100 PCIe 1,513 sparse -> 756.5. Longest matching name wins.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H200 NVL": 835.5,
    "H100": 989.4,
    "H100 PCIe": 756.5,
    "A100": 312.0,  # A100 datasheet: 312 dense bf16
}

VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # inside every vocabulary here


def siglip_model(tiny: bool) -> tuple[SiglipModel, int, int]:
    """A random SigLIP of ViT-B/16's shapes (or a tiny one), with its image size and text length."""
    sizes, image, patch, tokens, vocab = (TINY, 32, 16, 8, 100) if tiny else (VIT_B16, 224, 16, 64, 32000)
    config = SiglipConfig(
        text_config={**sizes, "vocab_size": vocab, "max_position_embeddings": tokens, **IDS},
        vision_config={**sizes, "image_size": image, "patch_size": patch},
    )
    torch.manual_seed(0)
    return SiglipModel(config), image, tokens


def peak_tflops(name: str) -> float | None:
    """Datasheet peak for a device name such as 'NVIDIA H200' (longest matching key), None if unknown."""
    hits = [key for key in PEAK_BF16_TFLOPS if key in name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n bf16 matrix product on ``device`` (mean of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - tic) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny SigLIP instead of ViT-B/16 (smoke test)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: by device name)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"

    model, image_size, tokens = siglip_model(args.tiny)
    backbone = HFBackbone(model, image_processor=None, tokenizer=None, kind="siglip")
    net = RetrievalModel(backbone, SigLIPLoss(gather=False)).to(device).train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "pixel_values": torch.randn(args.batch_size, 3, image_size, image_size, generator=gen),
        "input_ids": torch.randint(
            1, model.config.text_config.vocab_size, (args.batch_size, tokens), generator=gen
        ),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> torch.Tensor:
        with autocast:
            loss = net(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    with FlopCounterMode(display=False) as counter:  # one forward + backward, the optimiser outside
        with autocast:
            loss = net(batch)["loss"]
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()

    for _ in range(args.warmup):
        step()
    times: list[float] = []
    losses: list[torch.Tensor] = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        tic = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    median = statistics.median(times)
    achieved = flops / median / 1e12
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    measured_peak = matmul_tflops(device) if cuda else None
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "model": "tiny SigLIP" if args.tiny else "SigLIP ViT-B/16 shapes, random weights",
        "parameters_m": sum(p.numel() for p in params) / 1e6,
        "batch_size": args.batch_size,
        "precision": "bf16 autocast" if cuda else "fp32",
        "steps": args.steps,
        "median_step_s": median,
        "samples_per_s": args.batch_size / median,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "peak_tflops_datasheet": peak,
        "mfu_vs_datasheet": achieved / peak if peak else None,
        "matmul_tflops_measured": measured_peak,
        "mfu_vs_measured_matmul": achieved / measured_peak if measured_peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "last_loss": float(losses[-1]),
    }
    print(f"{result['model']}: {result['parameters_m']:.1f} M parameters, batch {args.batch_size}, {name}")
    print(
        f"median step {median * 1e3:.1f} ms, {result['samples_per_s']:.1f} samples/s, "
        f"{flops / 1e12:.2f} TFLOP/step, {achieved:.1f} TFLOP/s achieved"
    )
    if peak:
        print(f"MFU {100 * achieved / peak:.1f}% of the {peak} TFLOP/s datasheet peak")
    if measured_peak:
        print(
            f"{100 * achieved / measured_peak:.1f}% of a measured 8192^3 bf16 matmul ({measured_peak:.0f} TFLOP/s)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
