"""Losses against plain-Python loop references and hand-computed golden values, forward and backward."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import torch

from cliptune.losses import (
    DISTANCES,
    LOSSES,
    ContrastiveLoss,
    InfoNCELoss,
    SiameseLoss,
    SigLIPLoss,
    TripletLoss,
    contrastive,
    info_nce,
    info_nce_triplets,
    make_loss,
    siamese_objective,
    siglip,
    triplet_margin,
)
from cliptune.losses._checks import check_same_batch
from cliptune.losses.distances import cosine_distance, euclidean_distance, get_distance
from cliptune.losses.margin import contrastive_triplet

DTYPES = [torch.float32, torch.float64]
R = 1 / math.sqrt(2)  # 0.70711: cosine at 45 degrees
Rows = list[list[float]]


# ---------------------------------------------------------------- plain-Python references (no tensors)
def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def _cos(u: list[float], v: list[float]) -> float:
    return _dot(u, v) / math.sqrt(_dot(u, u) * _dot(v, v))


def _euclid(u: list[float], v: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)))


def _unit(u: list[float]) -> list[float]:
    n = math.sqrt(_dot(u, u))
    return [a / n for a in u]


REF_DIST: dict[str, Callable[[list[float], list[float]], float]] = {
    "cosine": lambda u, v: 1 - _cos(u, v),
    "euclidean": _euclid,
}


def ref_info_nce(img: Rows, txt: Rows, temperature: float) -> float:
    n = len(img)
    i2t = t2i = 0.0
    for i in range(n):
        row = [_cos(img[i], txt[j]) / temperature for j in range(n)]
        i2t += -row[i] + math.log(sum(math.exp(v) for v in row))
        col = [_cos(txt[i], img[j]) / temperature for j in range(n)]
        t2i += -col[i] + math.log(sum(math.exp(v) for v in col))
    return (i2t / n + t2i / n) / 2


def ref_siglip(img: Rows, txt: Rows, scale: float, bias: float) -> float:
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * _cos(img[i], txt[j]) + bias
            total += math.log(1 + math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / n


def ref_triplet(a: Rows, p: Rows, n: Rows, margin: float, distance: str) -> float:
    d = REF_DIST[distance]
    return sum(max(0.0, d(a[i], p[i]) - d(a[i], n[i]) + margin) for i in range(len(a))) / len(a)


def ref_triplet_in_batch(a: Rows, p: Rows, margin: float, distance: str) -> float:
    d = REF_DIST[distance]
    terms = [
        max(0.0, d(a[i], p[i]) - d(a[i], p[j]) + margin)
        for i in range(len(a))
        for j in range(len(a))
        if i != j
    ]
    return sum(terms) / len(terms)


def _hadsell_term(x: list[float], y: list[float], label: float, margin: float) -> float:
    d = _euclid(_unit(x), _unit(y))
    return label * d**2 + (1 - label) * max(0.0, margin - d) ** 2


def ref_contrastive(x: Rows, y: Rows, label: list[float], margin: float) -> float:
    return sum(_hadsell_term(x[i], y[i], label[i], margin) for i in range(len(x))) / len(x)


def ref_contrastive_all_pairs(x: Rows, y: Rows, margin: float) -> float:
    n = len(x)
    terms = [_hadsell_term(x[i], y[j], float(i == j), margin) for i in range(n) for j in range(n)]
    return sum(terms) / len(terms)


def _numgrad(fn: Callable[..., float], args: list[Rows], h: float = 1e-6) -> list[torch.Tensor]:
    """Central differences of a pure-Python reference with respect to each matrix argument."""
    grads = []
    for k, mat in enumerate(args):
        g = torch.zeros(len(mat), len(mat[0]), dtype=torch.float64)
        for i in range(len(mat)):
            for j in range(len(mat[0])):
                up = [[list(r) for r in m] for m in args]
                down = [[list(r) for r in m] for m in args]
                up[k][i][j] += h
                down[k][i][j] -= h
                g[i, j] = (fn(*up) - fn(*down)) / (2 * h)
        grads.append(g)
    return grads


def _rand(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}


def _check_forward_backward(
    loss_fn: Callable[..., torch.Tensor],
    ref_fn: Callable[..., float],
    inputs: list[torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Value equals the loop reference; autograd gradients equal finite differences of the reference."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*leaves)
    loss.backward()
    rows = [x.double().tolist() for x in inputs]
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(ref_fn(*rows), rel=1e-5 if dtype == torch.float32 else 1e-10)
    grad_tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-8}
    for leaf, expected in zip(leaves, _numgrad(ref_fn, rows), strict=True):
        torch.testing.assert_close(leaf.grad.double(), expected, **grad_tol)


# ---------------------------------------------------------------- InfoNCE
@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_golden_2x2(dtype: torch.dtype) -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=dtype)  # text 1 normalises to [r, r], r = 0.70711
    # cos = [[1, r], [0, r]], temperature 1.
    # i2t row 0: -1 + log(e^1 + e^r) = -1 + log(2.71828 + 2.02811) = 0.55739
    # i2t row 1: -r + log(e^0 + e^r) = -0.70711 + log(3.02811)        = 0.40083
    # t2i row 0 (logits [1, 0], target 0): log(1 + e^-1)                = 0.31326
    # t2i row 1 (logits [r, r], target 1): log 2                        = 0.69315
    # loss = ((0.55739 + 0.40083) / 2 + (0.31326 + 0.69315) / 2) / 2 = (0.47911 + 0.50320) / 2 = 0.49116
    assert info_nce(img, txt, 1.0).item() == pytest.approx(0.4911570396, abs=1e-6)
    out = InfoNCELoss(temperature=1.0)(img, txt)
    assert out["i2t"].item() == pytest.approx(0.4791096452, abs=1e-6)
    assert out["t2i"].item() == pytest.approx(0.5032044340, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.4911570396, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_info_nce_matches_loop_reference(dtype: torch.dtype, temperature: float) -> None:
    img, txt = _rand(4, 3, seed=0, dtype=dtype), _rand(4, 3, seed=1, dtype=dtype)
    _check_forward_backward(
        lambda i, t: info_nce(i, t, temperature),
        lambda i, t: ref_info_nce(i, t, temperature),
        [img, txt],
        dtype,
    )


def test_info_nce_tensor_temperature_gets_gradient() -> None:
    img, txt = _rand(4, 3, seed=2, dtype=torch.float64), _rand(4, 3, seed=3, dtype=torch.float64)
    temp = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(info_nce, (img.requires_grad_(), txt.requires_grad_(), temp))
    h = 1e-6
    loss = info_nce(img, txt, temp)
    loss.backward()
    rows = [img.tolist(), txt.tolist()]
    expected = (ref_info_nce(*rows, 0.5 + h) - ref_info_nce(*rows, 0.5 - h)) / (2 * h)
    assert temp.grad.item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_module_fixed_equals_function() -> None:
    img, txt = _rand(5, 4, seed=4, dtype=torch.float32), _rand(5, 4, seed=5, dtype=torch.float32)
    out = InfoNCELoss(temperature=0.07)(img, txt)
    assert out["loss"].item() == pytest.approx(info_nce(img, txt, 0.07).item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx((out["i2t"] + out["t2i"]).item() / 2, rel=1e-6)
    assert out["temperature"].item() == pytest.approx(0.07)
    assert list(InfoNCELoss(temperature=0.07).parameters()) == []


def test_info_nce_learned_temperature_is_log_parametrised() -> None:
    loss_fn = InfoNCELoss(temperature=0.05, learn_temperature=True)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(20.0))  # log(1 / 0.05)
    img, txt = _rand(5, 4, seed=6, dtype=torch.float32), _rand(5, 4, seed=7, dtype=torch.float32)
    out = loss_fn(img, txt)
    assert out["temperature"].item() == pytest.approx(0.05, rel=1e-6)
    assert not out["temperature"].requires_grad
    out["loss"].backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.item() != 0.0


def test_learned_temperature_scale_never_exceeds_max() -> None:
    # Aligned pairs: a sharper softmax always lowers the loss, so SGD pushes the scale up without bound.
    img = torch.eye(4)
    loss_fn = InfoNCELoss(temperature=0.5, learn_temperature=True, max_logit_scale=100.0)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=50.0)
    temps = []
    for _ in range(30):
        out = loss_fn(img, img)
        temps.append(out["temperature"].item())
        assert loss_fn.logit_scale.exp().item() <= 100.0 * (1 + 1e-6)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert min(temps) == pytest.approx(0.01, rel=1e-5)  # the clamp was reached (scale 100) ...
    assert temps[0] == pytest.approx(0.5)  # ... from 1 / 0.5 = 2

    # At the clamp the gradient still flows, so a loss preferring a softer softmax can pull it back.
    loss_fn.logit_scale.data.fill_(math.log(1000.0))
    anti = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = loss_fn(*anti)
    assert out["temperature"].item() == pytest.approx(0.01, rel=1e-5)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(100.0))
    out["loss"].backward()
    assert loss_fn.logit_scale.grad.item() > 0  # descent lowers logit_scale


def test_info_nce_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="exceeds max_logit_scale"):
        InfoNCELoss(temperature=0.001, learn_temperature=True)
    with pytest.raises(ValueError, match=r"share one \(B, D\) shape.*image_emb"):
        info_nce(torch.ones(3, 4), torch.ones(2, 4), 0.1)
    with pytest.raises(ValueError, match="2-D"):
        info_nce(torch.ones(3), torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="floating point.*int64"):
        InfoNCELoss()(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))


# ---------------------------------------------------------------- SigLIP
@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_golden_2x2(dtype: torch.dtype) -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=dtype)
    # cos = [[1, r], [0, r]]; logits = 2 * cos - 1 = [[1, 0.41421], [-1, 0.41421]]
    # (0,0) z=+1: log(1 + e^-1)       = 0.31326
    # (0,1) z=-1: log(1 + e^0.41421)  = 0.92155
    # (1,0) z=-1: log(1 + e^-1)       = 0.31326
    # (1,1) z=+1: log(1 + e^-0.41421) = 0.50734
    # loss = (0.31326 + 0.92155 + 0.31326 + 0.50734) / 2 = 1.02770
    assert siglip(img, txt, 2.0, -1.0).item() == pytest.approx(1.0277038896, abs=1e-6)
    loss_fn = SigLIPLoss(init_logit_scale=math.log(2.0), init_logit_bias=-1.0).to(dtype)
    assert loss_fn(img, txt)["loss"].item() == pytest.approx(1.0277038896, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_matches_loop_reference(dtype: torch.dtype) -> None:
    img, txt = _rand(4, 3, seed=8, dtype=dtype), _rand(4, 3, seed=9, dtype=dtype)
    _check_forward_backward(
        lambda i, t: siglip(i, t, 10.0, -10.0),
        lambda i, t: ref_siglip(i, t, 10.0, -10.0),
        [img, txt],
        dtype,
    )


def test_siglip_gradcheck_including_scale_and_bias() -> None:
    inputs = (
        _rand(3, 4, seed=10, dtype=torch.float64).requires_grad_(),
        _rand(3, 4, seed=11, dtype=torch.float64).requires_grad_(),
        torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
        torch.tensor(-2.0, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(siglip, inputs)


def test_siglip_module_defaults_and_fixed_mode() -> None:
    img, txt = _rand(5, 4, seed=12, dtype=torch.float32), _rand(5, 4, seed=13, dtype=torch.float32)
    loss_fn = SigLIPLoss()
    out = loss_fn(img, txt)
    assert out["scale"].item() == pytest.approx(10.0)  # exp(log 10)
    assert out["bias"].item() == pytest.approx(-10.0)
    assert out["loss"].item() == pytest.approx(siglip(img, txt, 10.0, -10.0).item(), rel=1e-6)
    assert {n for n, _ in loss_fn.named_parameters()} == {"logit_scale", "logit_bias"}
    assert list(SigLIPLoss(learnable=False).parameters()) == []


# ---------------------------------------------------------------- triplet margin
@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_golden(dtype: torch.dtype) -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    p = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=dtype)
    n = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
    # cosine, margin 1: row 0: (1 - r) - (1 - 0) + 1 = 0.29289; row 1: (1 - 1) - (1 - 0) + 1 = 0
    # mean = 0.29289 / 2 = 0.14645
    assert triplet_margin(a, p, n, margin=1.0, distance="cosine").item() == pytest.approx(0.1464466, abs=1e-6)
    # euclidean, margin 1: both rows: ||a - p|| = 1, ||a - n|| = sqrt 2; 1 - 1.41421 + 1 = 0.58579
    assert triplet_margin(a, p, n, margin=1.0, distance="euclidean").item() == pytest.approx(
        2 - math.sqrt(2), abs=1e-6
    )
    # margin 0.2 cosine: row 0: 0.29289 - 1 + 0.2 < 0 and row 1: 0 - 1 + 0.2 < 0, so nothing violates.
    assert triplet_margin(a, p, n, margin=0.2).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_triplet_matches_loop_reference(dtype: torch.dtype, distance: str) -> None:
    a, p, n = (_rand(5, 3, seed=s, dtype=dtype) for s in (14, 15, 16))
    margin = 1.0  # large enough that most rows are active, so gradients are exercised
    _check_forward_backward(
        lambda x, y, z: triplet_margin(x, y, z, margin, distance),
        lambda x, y, z: ref_triplet(x, y, z, margin, distance),
        [a, p, n],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_triplet_in_batch_matches_loop_reference(dtype: torch.dtype, distance: str) -> None:
    a, p = _rand(4, 3, seed=17, dtype=dtype), _rand(4, 3, seed=18, dtype=dtype)
    loss_fn = TripletLoss(margin=0.5, distance=distance)
    _check_forward_backward(
        lambda x, y: loss_fn(x, y)["loss"],
        lambda x, y: ref_triplet_in_batch(x, y, 0.5, distance),
        [a, p],
        dtype,
    )


def test_triplet_identical_points_have_finite_gradients() -> None:
    a = torch.ones(2, 3, requires_grad=True)
    triplet_margin(a, a.detach().clone(), torch.zeros(2, 3) + 2, distance="euclidean").backward()
    assert torch.isfinite(a.grad).all()


def test_triplet_errors_name_the_problem() -> None:
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"unknown distance 'manhattan'; known: \['cosine', 'euclidean'\]"):
        triplet_margin(x, x, x, distance="manhattan")
    with pytest.raises(ValueError, match="unknown distance"):
        TripletLoss(distance="dot")
    with pytest.raises(ValueError, match="at least 2"):
        TripletLoss()(torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="negative"):
        triplet_margin(x, x, torch.ones(3, 3))


# ---------------------------------------------------------------- contrastive (Hadsell)
@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_golden_3x2(dtype: torch.dtype) -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], dtype=dtype)
    y = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 5.0]], dtype=dtype)
    label = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    # normalised: row 0 [1,0] vs [0,1]: d^2 = 2, similar          -> 2
    #             row 1 [1,0] vs [r,r]: d^2 = 2 - 2r = 0.58579, d = 0.76537 > 0.5, dissimilar -> 0
    #             row 2 [0,1] vs [0,1]: d = 0, dissimilar -> (0.5 - 0)^2 = 0.25
    # mean = (2 + 0 + 0.25) / 3 = 0.75
    assert contrastive(x, y, label, margin=0.5).item() == pytest.approx(0.75, abs=1e-5)
    assert ContrastiveLoss(margin=0.5)(x, y, label)["loss"].item() == pytest.approx(0.75, abs=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_matches_loop_reference(dtype: torch.dtype) -> None:
    x, y = _rand(6, 3, seed=19, dtype=dtype), _rand(6, 3, seed=20, dtype=dtype)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=dtype)
    margin = 1.5  # most dissimilar pairs inside the margin, so the hinge term carries gradient
    _check_forward_backward(
        lambda a, b: contrastive(a, b, label, margin),
        lambda a, b: ref_contrastive(a, b, label.tolist(), margin),
        [x, y],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_all_pairs_matches_loop_reference(dtype: torch.dtype) -> None:
    x, y = _rand(4, 3, seed=21, dtype=dtype), _rand(4, 3, seed=22, dtype=dtype)
    loss_fn = ContrastiveLoss(margin=1.5)
    _check_forward_backward(
        lambda a, b: loss_fn(a, b)["loss"],
        lambda a, b: ref_contrastive_all_pairs(a, b, 1.5),
        [x, y],
        dtype,
    )


def test_contrastive_label_shape_error() -> None:
    with pytest.raises(ValueError, match=r"label must have shape \(2,\), got \(3,\)"):
        contrastive(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))


# ---------------------------------------------------------------- Siamese objective
def _item(image: list[float], text: list[float], fused: list[float]) -> dict[str, torch.Tensor]:
    return {
        k: torch.tensor([v], dtype=torch.float32)
        for k, v in (("image", image), ("text", text), ("fused", fused))
    }


def test_siamese_terms_by_hand() -> None:
    anchor = _item(image=[1, 0], text=[0, 1], fused=[1, 0])
    positive = _item(image=[1, 0], text=[1, 1], fused=[1, 1])
    negative = _item(image=[0, 1], text=[0, 1], fused=[1, 1])
    # cosine distance, margin 0.2, r = 0.70711, 1 - r = 0.29289
    # image: d([1,0],[1,0]) - d([1,0],[0,1]) + 0.2 = 0 - 1 + 0.2           -> 0
    # text : d([0,1],[1,1]) - d([0,1],[0,1]) + 0.2 = 0.29289 - 0 + 0.2     -> 0.49289
    # fused: d([1,0],[1,1]) - d([1,0],[1,1]) + 0.2 = 0.2                   -> 0.2
    # i2t  : anchor image [1,0] vs texts [1,1] / [0,1]: 0.29289 - 1 + 0.2  -> 0
    # t2i  : anchor text [0,1] vs images [1,0] / [0,1]: 1 - 0 + 0.2        -> 1.2
    # cross = (0 + 1.2) / 2 = 0.6; loss = 0 + 0.49289 + 0.2 + 0.6 = 1.29289
    out = siamese_objective(anchor, positive, negative)
    expected = {"image": 0.0, "text": 1.2 - R, "fused": 0.2, "i2t": 0.0, "t2i": 1.2, "cross": 0.6}
    expected["loss"] = 2.0 - R
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key
    # weights: fused off, cross doubled: 0 + 0.49289 + 0 + 2 * 0.6 = 1.69289
    weighted = SiameseLoss(weights={"fused": 0.0, "cross": 2.0})(anchor, positive, negative)
    assert weighted["loss"].item() == pytest.approx(1.2 - R + 1.2, abs=1e-6)
    assert weighted["fused"].item() == pytest.approx(0.2, abs=1e-6)  # still reported for logging


def test_siamese_terms_are_the_right_triplets() -> None:
    items = [
        {
            k: _rand(4, 3, seed=30 + 3 * i + j, dtype=torch.float64)
            for j, k in enumerate(("image", "text", "fused"))
        }
        for i in range(3)
    ]
    a, p, n = items
    out = siamese_objective(a, p, n, margin=0.7, distance="euclidean")
    for m in ("image", "text", "fused"):
        assert out[m].item() == pytest.approx(
            ref_triplet(a[m].tolist(), p[m].tolist(), n[m].tolist(), 0.7, "euclidean")
        )
    i2t = ref_triplet(a["image"].tolist(), p["text"].tolist(), n["text"].tolist(), 0.7, "euclidean")
    t2i = ref_triplet(a["text"].tolist(), p["image"].tolist(), n["image"].tolist(), 0.7, "euclidean")
    assert out["i2t"].item() == pytest.approx(i2t)
    assert out["t2i"].item() == pytest.approx(t2i)
    total = out["image"] + out["text"] + out["fused"] + (i2t + t2i) / 2
    assert out["loss"].item() == pytest.approx(total.item())


def test_siamese_errors() -> None:
    item = {k: torch.ones(2, 3) for k in ("image", "text", "fused")}
    with pytest.raises(ValueError, match=r"positive lacks key\(s\) \['fused'\]"):
        siamese_objective(item, {"image": item["image"], "text": item["text"]}, item)
    with pytest.raises(ValueError, match=r"unknown weight key\(s\) \['img'\]"):
        siamese_objective(item, item, item, weights={"img": 1.0})
    with pytest.raises(ValueError, match="unknown weight"):
        SiameseLoss(weights={"i2t": 1.0})


# ---------------------------------------------------------------- registry
def _call(
    name: str, module: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor
) -> dict[str, torch.Tensor]:
    if name == "siamese":
        item = {"image": img, "text": txt, "fused": img + txt}
        return module(
            item, {k: v.flip(0) for k, v in item.items()}, {k: v.roll(1, 0) for k, v in item.items()}
        )
    return module(img, txt)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_registered_loss_forward_backward(name: str) -> None:
    proj = torch.nn.Linear(3, 4)
    img, txt = (
        proj(_rand(4, 3, seed=40, dtype=torch.float32)),
        proj(_rand(4, 3, seed=41, dtype=torch.float32)),
    )
    module = make_loss(name)
    out = _call(name, module, img, txt)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert all(v.shape == () for v in out.values())
    out["loss"].backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_make_loss_errors() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown loss 'clip'; known: \['contrastive', 'info_nce', 'siamese', 'siglip', 'triplet'\]",
    ):
        make_loss("clip")
    with pytest.raises(ValueError, match=r"loss 'siglip': bad arguments \['temperature'\]"):
        make_loss("siglip", temperature=0.1)
    assert make_loss("triplet", margin=0.3, distance="euclidean").margin == 0.3


# ---------------------------------------------------------------- per-item terms (reduction="none")
def _ref_info_nce_pairs(img: Rows, txt: Rows, temperature: float) -> list[float]:
    n, out = len(img), []
    for i in range(n):
        row = [_cos(img[i], txt[j]) / temperature for j in range(n)]
        col = [_cos(txt[i], img[j]) / temperature for j in range(n)]
        i2t = -row[i] + math.log(sum(math.exp(v) for v in row))
        t2i = -col[i] + math.log(sum(math.exp(v) for v in col))
        out.append((i2t + t2i) / 2)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce_per_pair_terms_match_loop_and_mean(dtype: torch.dtype) -> None:
    img, txt = _rand(6, 4, seed=30, dtype=dtype), _rand(6, 4, seed=31, dtype=dtype)
    per_pair = info_nce(img, txt, 0.1, reduction="none")
    assert per_pair.shape == (6,) and per_pair.dtype == dtype
    expected = _ref_info_nce_pairs(img.double().tolist(), txt.double().tolist(), 0.1)
    torch.testing.assert_close(per_pair.double(), torch.tensor(expected, dtype=torch.float64), **_tol(dtype))
    torch.testing.assert_close(per_pair.mean(), info_nce(img, txt, 0.1), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_triplet_and_contrastive_per_item_terms_match_loop_and_mean(
    dtype: torch.dtype, distance: str
) -> None:
    a, p, n = (_rand(5, 3, seed=s, dtype=dtype) for s in (32, 33, 34))
    per = triplet_margin(a, p, n, 1.0, distance, reduction="none")
    rows = [x.double().tolist() for x in (a, p, n)]
    expected = [ref_triplet([x], [y], [z], 1.0, distance) for x, y, z in zip(*rows, strict=True)]
    torch.testing.assert_close(per.double(), torch.tensor(expected, dtype=torch.float64), **_tol(dtype))
    assert torch.equal(per.mean(), triplet_margin(a, p, n, 1.0, distance))  # the mean IS the loss
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5], dtype=dtype)
    per = contrastive(a, p, label, 0.8, reduction="none")
    expected = [
        _hadsell_term(x, y, lab, 0.8) for x, y, lab in zip(rows[0], rows[1], label.tolist(), strict=True)
    ]
    torch.testing.assert_close(per.double(), torch.tensor(expected, dtype=torch.float64), **_tol(dtype))
    assert torch.equal(per.mean(), contrastive(a, p, label, 0.8))


def test_siamese_per_triplet_terms_match_loop_and_mean() -> None:
    gen = torch.Generator().manual_seed(35)
    a, p, n = ({k: torch.randn(6, 4, generator=gen) for k in ("image", "text", "fused")} for _ in range(3))
    weights = {"image": 2.0, "cross": 0.5}
    per = siamese_objective(a, p, n, weights, margin=0.3, reduction="none")
    mean = siamese_objective(a, p, n, weights, margin=0.3)
    for key, value in per.items():
        assert value.shape == (6,), key
        assert value.mean().item() == pytest.approx(mean[key].item(), rel=1e-6), key
    for t in range(6):  # one triplet at a time is the reference
        one = siamese_objective(*({k: v[t : t + 1] for k, v in x.items()} for x in (a, p, n)), weights, 0.3)
        for key in per:
            assert per[key][t].item() == pytest.approx(one[key].item(), rel=1e-6, abs=1e-7), (key, t)


def test_reduction_must_be_mean_or_none() -> None:
    x = torch.randn(3, 4)
    for call in (
        lambda: info_nce(x, x, 0.1, reduction="sum"),  # type: ignore[arg-type]
        lambda: triplet_margin(x, x, x, reduction="sum"),  # type: ignore[arg-type]
        lambda: contrastive(x, x, torch.ones(3), reduction="sum"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
            call()


# --- messages name the function and the facts; zero temperature is rejected (`make mutation MUTATE=losses`) --


def test_batch_check_messages_name_the_loss_and_every_input() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(3, 3)
    for call, where, names in (
        (lambda: info_nce(a, b, 0.07), "info_nce", ("image_emb", "text_emb")),
        (lambda: siglip(a, b, 1.0, 0.0), "siglip", ("image_emb", "text_emb")),
        (lambda: info_nce_triplets(a, a, b), "info_nce_triplets", ("anchor", "positive", "negative")),
    ):
        with pytest.raises(ValueError) as err:
            call()
        shapes = dict(zip(names, [(2, 3)] * (len(names) - 1) + [(3, 3)], strict=True))
        assert str(err.value) == f"{where}: all inputs must share one (B, D) shape, got {shapes}"
    with pytest.raises(ValueError) as err:
        info_nce(a, a, 0.07, reduction="sum")
    assert str(err.value) == "info_nce: reduction must be 'mean' or 'none', got 'sum'"
    with pytest.raises(ValueError) as err:
        info_nce_triplets(a, a, a, reduction="sum")
    assert str(err.value) == "info_nce_triplets: reduction must be 'mean' or 'none', got 'sum'"


def test_zero_temperature_is_rejected() -> None:
    x = torch.eye(2)
    with pytest.raises(ValueError) as err:
        info_nce(x, x, 0.0)
    assert str(err.value) == "info_nce: temperature must be > 0, got 0.0"
    with pytest.raises(ValueError) as err:
        info_nce_triplets(x, x, x, temperature=0)
    assert str(err.value) == "info_nce_triplets: temperature must be > 0, got 0"


# --- edges, defaults, messages and the cross-process path (survivors of `make mutation MUTATE=losses`) -----


def test_paired_distances_are_the_documented_values() -> None:
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 2.0], [3.0, 4.0], [-1.0, 0.0]], dtype=torch.float64)
    # cosine: 1 - 0 = 1; 1 - 1 = 0; 1 - (-1) = 2
    torch.testing.assert_close(cosine_distance(x, y), torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    # euclidean: sqrt(1 + 4); identical rows count as 1e-6 apart (sqrt of the 1e-12 floor); 3
    torch.testing.assert_close(
        euclidean_distance(x, y),
        torch.tensor([math.sqrt(5.0), 1e-6, 3.0], dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )
    assert get_distance("cosine")(x, y).tolist() == cosine_distance(x, y).tolist()


@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_pairwise_distances_match_the_paired_form_row_by_row(distance: str) -> None:
    x, y = _rand(3, 4, seed=50, dtype=torch.float64), _rand(5, 4, seed=51, dtype=torch.float64)
    y[1] = x[0]  # an identical pair hits the floor
    pairwise = DISTANCES[distance].pairwise(x, y)
    assert pairwise.shape == (3, 5)
    for i in range(3):
        for j in range(5):
            expected = REF_DIST[distance](x[i].tolist(), y[j].tolist())
            if distance == "euclidean":
                expected = max(expected, 1e-6)
            assert pairwise[i, j].item() == pytest.approx(expected, abs=1e-9), (i, j)


def test_identical_euclidean_pair_is_floored_with_zero_gradient() -> None:
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    d = euclidean_distance(a, a.detach().clone())
    assert d.item() == pytest.approx(1e-6, rel=1e-9)
    d.sum().backward()
    assert a.grad is not None and a.grad.abs().sum().item() == 0.0


def test_batch_check_messages_state_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError) as err:
        check_same_batch("f", a=torch.zeros(0, 3), b=torch.zeros(0, 3))
    assert str(err.value) == "f: expected non-empty 2-D (B, D) tensors, got {'a': (0, 3), 'b': (0, 3)}"
    with pytest.raises(ValueError) as err:
        check_same_batch("f", a=torch.zeros(2, 3, 1), b=torch.zeros(2, 3))
    assert str(err.value) == "f: expected non-empty 2-D (B, D) tensors, got {'a': (2, 3, 1), 'b': (2, 3)}"
    with pytest.raises(ValueError) as err:
        check_same_batch("f", a=torch.zeros(2, 3), b=torch.zeros(2, 3, dtype=torch.int32))
    assert str(err.value) == "f: embeddings must be floating point, got {'b': 'torch.int32'}"
    check_same_batch("f", a=torch.zeros(1, 1), b=torch.zeros(1, 1))  # one row of one dimension is a batch


def test_info_nce_module_messages_and_scale_bound_edges() -> None:
    with pytest.raises(ValueError) as err:
        InfoNCELoss(temperature=-0.5)
    assert str(err.value) == "InfoNCELoss: temperature must be > 0, got -0.5"
    with pytest.raises(ValueError) as err:
        InfoNCELoss(temperature=0.005, learn_temperature=True, max_logit_scale=150.0)
    assert str(err.value) == "InfoNCELoss: initial scale 1/temperature = 200 exceeds max_logit_scale = 150"
    with pytest.raises(ValueError) as err:
        info_nce(torch.eye(2), torch.eye(2), -1)
    assert str(err.value) == "info_nce: temperature must be > 0, got -1"
    # Exactly at the bound is allowed; a fixed temperature is not bounded at all.
    at_bound = InfoNCELoss(temperature=0.01, learn_temperature=True)
    assert at_bound.logit_scale.item() == pytest.approx(math.log(100.0))
    assert InfoNCELoss(temperature=0.001)(torch.eye(2), torch.eye(2))["temperature"].item() == pytest.approx(
        0.001
    )
    assert InfoNCELoss.DEFAULT_MAX_LOGIT_SCALE == 100.0
    assert InfoNCELoss().gather and SigLIPLoss().gather
    assert InfoNCELoss().max_logit_scale == 100.0 and not InfoNCELoss().learn_temperature


def test_learned_scale_is_clamped_to_its_own_bound_before_forward() -> None:
    loss_fn = InfoNCELoss(temperature=0.1, learn_temperature=True, max_logit_scale=20.0)
    loss_fn.logit_scale.data.fill_(math.log(50.0))
    img, txt = _rand(3, 4, seed=62, dtype=torch.float64), _rand(3, 4, seed=63, dtype=torch.float64)
    out = loss_fn.double()(img, txt)
    assert out["temperature"].item() == pytest.approx(1 / 20.0, rel=1e-9)
    assert out["loss"].item() == pytest.approx(ref_info_nce(img.tolist(), txt.tolist(), 1 / 20.0), rel=1e-9)
    below = InfoNCELoss(temperature=0.1, learn_temperature=True, max_logit_scale=20.0)
    assert below(torch.eye(3), torch.eye(3))["temperature"].item() == pytest.approx(0.1, rel=1e-6)


# The package re-exports the functions under the modules' names, so reach the modules themselves.
info_nce_module = importlib.import_module("cliptune.losses.info_nce")
siglip_module = importlib.import_module("cliptune.losses.siglip")


def _fake_two_processes(
    monkeypatch: pytest.MonkeyPatch, module: object, rank: int, others: list[torch.Tensor]
) -> None:
    """Pretend to be process ``rank`` of 2: gathering puts ``x`` at this rank's slot, the other's rows elsewhere."""
    calls = iter(others)

    def gather(x: torch.Tensor) -> torch.Tensor:
        other = next(calls)
        return torch.cat([x, other] if rank == 0 else [other, x])

    monkeypatch.setattr(module, "rank_and_world_size", lambda: (rank, 2))
    monkeypatch.setattr(module, "gather_with_grad", gather)


def _ref_directional(q: Rows, k: Rows, offset: int, temperature: float) -> float:
    total = 0.0
    for i, row in enumerate(q):
        logits = [_cos(row, key) / temperature for key in k]
        total += -logits[offset + i] + math.log(sum(math.exp(v) for v in logits))
    return total / len(q)


@pytest.mark.parametrize("rank", [0, 1])
def test_info_nce_gathers_negatives_from_the_other_process(
    monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    img, txt = _rand(4, 3, seed=52, dtype=torch.float64), _rand(4, 3, seed=53, dtype=torch.float64)
    mine, theirs = slice(2 * rank, 2 * rank + 2), slice(2 - 2 * rank, 4 - 2 * rank)
    unit = torch.nn.functional.normalize
    _fake_two_processes(
        monkeypatch, info_nce_module, rank, [unit(img[theirs], dim=-1), unit(txt[theirs], dim=-1)]
    )
    out = InfoNCELoss(temperature=0.5)(img[mine], txt[mine])
    i2t = _ref_directional(img[mine].tolist(), txt.tolist(), 2 * rank, 0.5)
    t2i = _ref_directional(txt[mine].tolist(), img.tolist(), 2 * rank, 0.5)
    assert out["i2t"].item() == pytest.approx(i2t, rel=1e-9)
    assert out["t2i"].item() == pytest.approx(t2i, rel=1e-9)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)
    local = InfoNCELoss(temperature=0.5, gather=False)(img[mine], txt[mine])  # no gathering: local batch only
    assert local["loss"].item() == pytest.approx(
        ref_info_nce(img[mine].tolist(), txt[mine].tolist(), 0.5), rel=1e-9
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_siglip_gathers_texts_from_the_other_process(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    img, txt = _rand(4, 3, seed=54, dtype=torch.float64), _rand(4, 3, seed=55, dtype=torch.float64)
    mine, theirs = slice(2 * rank, 2 * rank + 2), slice(2 - 2 * rank, 4 - 2 * rank)
    _fake_two_processes(
        monkeypatch, siglip_module, rank, [torch.nn.functional.normalize(txt[theirs], dim=-1)]
    )
    loss_fn = SigLIPLoss(init_logit_scale=math.log(3.0), init_logit_bias=-1.5).double()
    out = loss_fn(img[mine], txt[mine])
    expected = 0.0
    for i, row in enumerate(img[mine].tolist()):
        for j, key in enumerate(txt.tolist()):
            z = 1.0 if j == 2 * rank + i else -1.0
            expected += math.log(1 + math.exp(-z * (3.0 * _cos(row, key) - 1.5)))
    # rel 1e-7: the module holds log 3 as float32 before .double()
    assert out["loss"].item() == pytest.approx(expected / 2, rel=1e-7)
    assert out["scale"].item() == pytest.approx(3.0) and out["bias"].item() == pytest.approx(-1.5)
    loss_fn.gather = False
    local = loss_fn(img[mine], txt[mine])["loss"].item()
    assert local == pytest.approx(ref_siglip(img[mine].tolist(), txt[mine].tolist(), 3.0, -1.5), rel=1e-7)


def test_siglip_divides_by_rows_not_pairs() -> None:
    # One pair, cos 1: -log sigmoid(s + b); three pairs of orthogonal rows: 3 * (log sigmoid'(b) + 2 ...) / 3
    x = torch.eye(3)
    expected = (3 * math.log(1 + math.exp(-(2.0 + 0.5))) + 6 * math.log(1 + math.exp(0.5))) / 3
    assert siglip(x, x, 2.0, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_margin_losses_defaults_are_the_documented_ones() -> None:
    a, p, n = (_rand(4, 3, seed=s, dtype=torch.float64) for s in (56, 57, 58))
    assert triplet_margin(a, p, n).item() == pytest.approx(
        ref_triplet(a.tolist(), p.tolist(), n.tolist(), 0.2, "cosine")
    )
    loss_fn = TripletLoss()
    assert (loss_fn.margin, loss_fn.distance) == (0.2, "cosine")
    assert loss_fn(a, p)["loss"].item() == pytest.approx(
        ref_triplet_in_batch(a.tolist(), p.tolist(), 0.2, "cosine")
    )
    assert loss_fn(a, p, n)["loss"].item() == pytest.approx(triplet_margin(a, p, n).item())
    label = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert contrastive(a, p, label).item() == pytest.approx(
        ref_contrastive(a.tolist(), p.tolist(), label.tolist(), 0.5)
    )
    assert ContrastiveLoss().margin == 0.5
    assert ContrastiveLoss()(a, p)["loss"].item() == pytest.approx(
        ref_contrastive_all_pairs(a.tolist(), p.tolist(), 0.5)
    )


@pytest.mark.parametrize("distance", sorted(DISTANCES))
def test_contrastive_triplet_matches_hadsell_by_hand(distance: str) -> None:
    a, p, n = (_rand(4, 3, seed=s, dtype=torch.float64) for s in (59, 60, 61))
    d = REF_DIST[distance]
    terms = [
        (d(x, y) ** 2 + max(0.0, 0.9 - d(x, z)) ** 2) / 2
        for x, y, z in zip(a.tolist(), p.tolist(), n.tolist(), strict=True)
    ]
    per = contrastive_triplet(a, p, n, margin=0.9, distance=distance, reduction="none")
    torch.testing.assert_close(per, torch.tensor(terms, dtype=torch.float64))
    assert contrastive_triplet(a, p, n, 0.9, distance).item() == pytest.approx(sum(terms) / 4)
    default = [
        (REF_DIST["cosine"](x, y) ** 2 + max(0.0, 0.2 - REF_DIST["cosine"](x, z)) ** 2) / 2
        for x, y, z in zip(a.tolist(), p.tolist(), n.tolist(), strict=True)
    ]
    assert contrastive_triplet(a, p, n).item() == pytest.approx(sum(default) / 4)


def test_margin_losses_edges_and_messages() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Two pairs are enough for in-batch negatives: each anchor has one negative.
    assert TripletLoss(margin=0.5)(x, x)["loss"].item() == pytest.approx(
        0.0
    )  # d(a,p)=0, d(a,n)=1: 0 - 1 + 0.5 < 0
    assert TripletLoss(margin=1.5)(x, x)["loss"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError) as err:
        TripletLoss()(torch.ones(1, 3), torch.ones(1, 3))
    assert str(err.value) == "TripletLoss: in-batch negatives need a batch of at least 2 pairs"
    with pytest.raises(ValueError) as err:
        TripletLoss()(torch.ones(2, 3), torch.ones(3, 3))
    assert str(err.value).startswith("TripletLoss: all inputs must share one (B, D) shape")
    with pytest.raises(ValueError) as err:
        ContrastiveLoss()(torch.ones(2, 3), torch.ones(3, 3))
    assert str(err.value).startswith("ContrastiveLoss: all inputs must share one (B, D) shape")
    with pytest.raises(ValueError) as err:
        contrastive_triplet(x, x, torch.ones(3, 2))
    assert str(err.value).startswith("contrastive_triplet: all inputs must share one (B, D) shape")
    with pytest.raises(ValueError) as err:
        contrastive(x, x, torch.ones(2), reduction="sum")  # type: ignore[arg-type]
    assert str(err.value) == "contrastive: reduction must be 'mean' or 'none', got 'sum'"
    with pytest.raises(ValueError) as err:
        triplet_margin(x, x, x, reduction="sum")  # type: ignore[arg-type]
    assert str(err.value) == "triplet_margin: reduction must be 'mean' or 'none', got 'sum'"
    with pytest.raises(ValueError) as err:
        contrastive_triplet(x, x, x, reduction="sum")  # type: ignore[arg-type]
    assert str(err.value) == "contrastive_triplet: reduction must be 'mean' or 'none', got 'sum'"
    # Identical dissimilar pair: distance floored at 1e-6, so the hinge is (margin - 1e-6)^2, gradient finite.
    y = x.clone().requires_grad_(True)
    loss = contrastive(x, y, torch.zeros(2), margin=0.5)
    assert loss.item() == pytest.approx((0.5 - 1e-6) ** 2, rel=1e-6)
    loss.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    # All-pairs form with identical matching rows: only the off-diagonal (distance sqrt 2 > 0.5) pairs, all 0.
    assert ContrastiveLoss()(x, x)["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_module_batch_checks_name_the_module_and_both_inputs() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(3, 3)
    for module, where in ((InfoNCELoss(), "InfoNCELoss"), (SigLIPLoss(), "SigLIPLoss")):
        with pytest.raises(ValueError) as err:
            module(a, b)
        expected = f"{where}: all inputs must share one (B, D) shape, got {{'image_emb': (2, 3), 'text_emb': (3, 3)}}"
        assert str(err.value) == expected


def test_modules_pass_their_margin_and_distance_on() -> None:
    a, p, n = (_rand(4, 3, seed=s, dtype=torch.float64) for s in (64, 65, 66))
    rows = [a.tolist(), p.tolist(), n.tolist()]
    out = TripletLoss(margin=0.7, distance="euclidean")(a, p, n)["loss"]
    assert out.item() == pytest.approx(ref_triplet(*rows, 0.7, "euclidean"))
    label = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = ContrastiveLoss(margin=1.3)(a, p, label)["loss"]
    assert out.item() == pytest.approx(ref_contrastive(rows[0], rows[1], label.tolist(), 1.3))


def test_margin_function_messages_name_the_function_and_every_input() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(3, 3)
    three = "{'anchor': (2, 3), 'positive': (2, 3), 'negative': (3, 3)}"
    for call, expected in (
        (
            lambda: triplet_margin(a, a, b),
            f"triplet_margin: all inputs must share one (B, D) shape, got {three}",
        ),
        (
            lambda: contrastive_triplet(a, a, b),
            f"contrastive_triplet: all inputs must share one (B, D) shape, got {three}",
        ),
        (
            lambda: TripletLoss()(a, b),
            "TripletLoss: all inputs must share one (B, D) shape, got {'anchor': (2, 3), 'positive': (3, 3)}",
        ),
        (
            lambda: ContrastiveLoss()(a, b),
            "ContrastiveLoss: all inputs must share one (B, D) shape, got {'image_emb': (2, 3), 'text_emb': (3, 3)}",
        ),
        (
            lambda: contrastive(a, b, torch.ones(2)),
            "contrastive: all inputs must share one (B, D) shape, got {'x': (2, 3), 'y': (3, 3)}",
        ),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == expected


def test_siglip_fixed_mode_keeps_scale_and_bias_as_named_buffers() -> None:
    loss_fn = SigLIPLoss(init_logit_scale=math.log(4.0), init_logit_bias=-2.0, learnable=False)
    assert set(loss_fn.state_dict()) == {"logit_scale", "logit_bias"}
    img, txt = _rand(3, 4, seed=67, dtype=torch.float32), _rand(3, 4, seed=68, dtype=torch.float32)
    out = loss_fn(img, txt)
    assert out["scale"].item() == pytest.approx(4.0) and out["bias"].item() == pytest.approx(-2.0)
    assert out["loss"].item() == pytest.approx(ref_siglip(img.tolist(), txt.tolist(), 4.0, -2.0), rel=1e-5)


def test_siglip_middle_process_of_three_scores_its_own_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 1 of 3 with 2 rows each: image i's caption is global text 2 + i (a wrap-around index would
    # coincide with it for 2 processes, not for 3).
    img, txt = _rand(6, 3, seed=69, dtype=torch.float64), _rand(6, 3, seed=70, dtype=torch.float64)
    unit = torch.nn.functional.normalize(txt, dim=-1)
    monkeypatch.setattr(siglip_module, "rank_and_world_size", lambda: (1, 3))
    monkeypatch.setattr(siglip_module, "gather_with_grad", lambda x: torch.cat([unit[:2], x, unit[4:]]))
    out = SigLIPLoss(init_logit_scale=0.0, init_logit_bias=0.0).double()(img[2:4], txt[2:4])
    expected = 0.0
    for i, row in enumerate(img[2:4].tolist()):
        for j, key in enumerate(txt.tolist()):
            z = 1.0 if j == 2 + i else -1.0
            expected += math.log(1 + math.exp(-z * _cos(row, key)))
    assert out["loss"].item() == pytest.approx(expected / 2, rel=1e-9)


def test_cosine_distances_hold_for_tiny_vectors() -> None:
    # Norms of 1e-9: a normalising floor above that (torch's default 1e-8) would shrink the cosine to 0.01.
    x = torch.tensor([[1e-9, 0.0], [0.0, 1e-9]], dtype=torch.float64)
    torch.testing.assert_close(cosine_distance(x, x), torch.zeros(2, dtype=torch.float64))
    expected = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(DISTANCES["cosine"].pairwise(x, x), expected)
