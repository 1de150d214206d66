"""Tests for the Siamese fusion head: shapes, weight sharing, masks, save/load, gradients, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cliptune.models.siamese import SiameseHead, SiameseOutput

FI, FT = 12, 10


def tiny_head(**kw) -> SiameseHead:
    torch.manual_seed(0)
    kw = {"width": 16, "depth": 2, "heads": 2, "dropout": 0.0, **kw}
    return SiameseHead(FI, FT, **kw)


def test_output_shapes_and_normalisation() -> None:
    head = tiny_head().eval()
    out = head(torch.randn(5, FI), torch.randn(5, FT))
    assert isinstance(out, SiameseOutput)
    assert [t.shape for t in out] == [(5, 16)] * 3
    for t in out:
        assert torch.allclose(t.norm(dim=1), torch.ones(5), atol=1e-5)
    d = out.as_dict()
    assert set(d) == {"image", "text", "fused"} and d["fused"] is out.fused
    assert tiny_head(out_dim=8).eval()(torch.randn(3, FI), torch.randn(3, FT)).fused.shape == (3, 8)
    assert tiny_head(out_dim=8).out_dim == 8


def test_same_weights_for_every_item_of_a_triplet() -> None:
    head = tiny_head().eval()
    img, txt = torch.randn(4, FI), torch.randn(4, FT)
    anchor, positive = head(img, txt), head(img.clone(), txt.clone())  # the same input twice
    for a, p in zip(anchor, positive, strict=True):
        assert torch.equal(a, p)
    # applying the head to a stacked (3B) batch equals applying it three times: items do not interact
    neg_img, neg_txt = torch.randn(4, FI), torch.randn(4, FT)
    stacked = head(torch.cat([img, img, neg_img]), torch.cat([txt, txt, neg_txt]))
    negative = head(neg_img, neg_txt)
    assert torch.allclose(stacked.fused[8:], negative.fused, atol=1e-6)
    assert torch.allclose(stacked.fused[:4], anchor.fused, atol=1e-6)


def _naive_fused_without_text(head: SiameseHead, image: Tensor) -> Tensor:
    """Reference: run the encoder on the 2-token sequence [FUSE, image] (no text token at all)."""
    img_tok = head.image_proj(image) + head.modality[0]  # (B, W)
    tokens = torch.stack([head.fuse_token.expand(image.shape[0], -1), img_tok], dim=1)  # (B, 2, W)
    x = tokens
    for layer in head.encoder.layers:  # pre-norm block written out by hand
        h = layer.norm1(x)
        x = x + layer.self_attn(h, h, h, need_weights=False)[0]
        x = x + layer.linear2(F.gelu(layer.linear1(layer.norm2(x))))
    return F.normalize(head.out_proj(head.norm(x[:, 0])), dim=-1)  # (B, D)


def test_image_only_items_with_has_text_mask() -> None:
    head = tiny_head().eval()
    img, txt = torch.randn(4, FI), torch.randn(4, FT)
    has_text = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = head(img, txt, has_text=has_text)
        garbage = head(img, txt * 100 + 5, has_text=has_text)  # text of image-only items is ignored ...
        full = head(img, txt)
        naive = _naive_fused_without_text(head, img)
    assert torch.allclose(out.fused[[1, 3]], garbage.fused[[1, 3]], atol=1e-6)
    assert torch.equal(out.text[[1, 3]], torch.zeros(2, 16))  # ... and its text embedding is zero
    assert torch.allclose(out.fused[[1, 3]], naive[[1, 3]], atol=1e-5)  # == never seeing a text token
    assert torch.allclose(out.fused[[0, 2]], full.fused[[0, 2]], atol=1e-6)  # items with text unchanged
    assert torch.allclose(out.image.norm(dim=1), torch.ones(4), atol=1e-5)
    text_only = head(img, txt, has_image=torch.tensor([False, True, True, True]))
    assert torch.equal(text_only.image[0], torch.zeros(16))
    with pytest.raises(ValueError, match=r"items \[1\] .* neither"):
        head(img, txt, has_image=torch.tensor([True, False, True, True]), has_text=has_text)


def test_bad_shapes_and_config_are_named() -> None:
    head = tiny_head()
    with pytest.raises(ValueError, match=r"image must be \(B, 12\)"):
        head(torch.randn(2, 5), torch.randn(2, FT))
    with pytest.raises(ValueError, match=r"text must be \(2, 10\)"):
        head(torch.randn(2, FI), torch.randn(3, FT))
    with pytest.raises(ValueError, match="divisible by heads"):
        SiameseHead(FI, FT, width=10, heads=4)


def test_save_load_bitwise(tmp_path: Path) -> None:
    head = tiny_head(out_dim=8, dropout=0.1)
    head.save(tmp_path / "siamese")
    loaded = SiameseHead.load(tmp_path / "siamese")
    assert not loaded.training
    sd, sd2 = head.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    img, txt = torch.randn(3, FI), torch.randn(3, FT)
    for a, b in zip(head.eval()(img, txt), loaded(img, txt), strict=True):
        assert torch.equal(a, b)
    config = json.loads((tmp_path / "siamese" / "config.json").read_text())
    assert config == {"format": "cliptune-siamese-head-v1", "image_dim": FI, "text_dim": FT, "width": 16,
                      "depth": 2, "heads": 2, "dropout": 0.1, "out_dim": 8}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "siamese").iterdir()) == ["config.json", "model.safetensors"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        SiameseHead.load(tmp_path)
    tiny_head().save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="config.json: field 'format'"):
        SiameseHead.load(tmp_path)


def test_gradients_reach_every_parameter() -> None:
    head = tiny_head().train()
    out = head(torch.randn(4, FI), torch.randn(4, FT))
    target = torch.randn(3, 4, 16)
    loss = sum(((t - g) ** 2).sum() for t, g in zip(out, target, strict=True))
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _triplets(n: int, gen: torch.Generator) -> tuple[tuple[Tensor, Tensor], ...]:
    """Anchor / positive (same 4-d latent + small noise) / negative (new latent); big nuisance dims.

    Only the first 4 feature dims carry identity; the rest is per-item noise 3x larger, so a random
    projection barely separates positives from negatives and the head has to learn where to look.
    """

    def item(latent: Tensor, dim: int) -> Tensor:
        nuisance = 3.0 * torch.randn(n, dim - 4, generator=gen)
        return torch.cat([latent + 0.1 * torch.randn(n, 4, generator=gen), nuisance], dim=1)  # (n, dim)

    latent, other = torch.randn(n, 4, generator=gen), torch.randn(n, 4, generator=gen)
    return tuple((item(z, FI), item(z, FT)) for z in (latent, latent, other))


def _triplet_loss_and_accuracy(a: SiameseOutput, p: SiameseOutput, n: SiameseOutput) -> tuple[Tensor, Tensor]:
    """Cosine triplet margin loss summed over the three modalities; fused triplet accuracy."""
    loss = torch.zeros(())
    for key in ("image", "text", "fused"):
        sim_p = (getattr(a, key) * getattr(p, key)).sum(1)  # (B,)
        sim_n = (getattr(a, key) * getattr(n, key)).sum(1)  # (B,)
        loss = loss + F.relu(sim_n - sim_p + 0.2).mean()
    accuracy = ((a.fused * p.fused).sum(1) > (a.fused * n.fused).sum(1)).float().mean()
    return loss, accuracy


@pytest.fixture
def one_thread():
    """Tiny ops gain nothing from 2 threads and crawl when the cores are shared: use one, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_tiny_training_run_learns_triplets() -> None:
    gen = torch.Generator().manual_seed(0)
    train, held_out = _triplets(1024, gen), _triplets(256, gen)  # fixed embeddings
    head = tiny_head(width=32, heads=4, depth=1)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)

    def evaluate() -> tuple[float, float]:
        head.eval()
        with torch.no_grad():
            loss, acc = _triplet_loss_and_accuracy(*(head(i, t) for i, t in held_out))
        head.train()
        return loss.item(), acc.item()

    loss0, acc0 = evaluate()
    for _ in range(100):
        rows = torch.randint(0, 1024, (64,), generator=gen)
        outs = [head(i[rows], t[rows]) for i, t in train]  # one module, applied to each item of the triplet
        loss, _ = _triplet_loss_and_accuracy(*outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, acc1 = evaluate()
    # measured: held-out loss 0.85 -> 0.05, fused triplet accuracy 0.54 -> 0.97
    assert loss1 < 0.2 * loss0, (loss0, loss1)
    assert acc0 < 0.7 and acc1 > 0.9, (acc0, acc1)
