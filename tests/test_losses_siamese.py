"""The Siamese task's three losses (triplet, contrastive, InfoNCE over triplets): hand-computed golden values
on a two-triplet batch and plain-Python loop references per modality term."""

from __future__ import annotations

import math

import pytest
import torch

from cliptune.config import TASK_LOSSES
from cliptune.losses import (
    SIAMESE_LOSSES,
    SiameseLoss,
    contrastive_triplet,
    info_nce_triplets,
    siamese_objective,
    triplet_margin,
)

R = 1 / math.sqrt(2)  # 0.70711: cosine at 45 degrees
E = math.e
Rows = list[list[float]]

# Two triplets in 2-D (cosine distance d = 1 - cos):
#   1: a=[1,0] p=[1,0] n=[0,1]   d(a,p) = 0          d(a,n) = 1
#   2: a=[0,1] p=[1,1] n=[0,1]   d(a,p) = 1 - R      d(a,n) = 0
A = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
P = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
N = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)


# ---------------------------------------------------------------- plain-Python references (no tensors)
def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


REF_DIST = {
    "cosine": lambda u, v: 1 - _cos(u, v),
    "euclidean": lambda u, v: math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True))),
}


def ref_terms(
    loss: str, a: Rows, p: Rows, n: Rows, margin: float, temperature: float, distance: str
) -> list[float]:
    """One value per triplet, by the textbook formula, one loop per triplet."""
    d, out = REF_DIST[distance], []
    for i in range(len(a)):
        if loss == "triplet":
            out.append(max(0.0, d(a[i], p[i]) - d(a[i], n[i]) + margin))
        elif loss == "contrastive":  # Hadsell on the similar pair (a, p) and the dissimilar pair (a, n)
            out.append((d(a[i], p[i]) ** 2 + max(0.0, margin - d(a[i], n[i])) ** 2) / 2)
        else:  # InfoNCE: anchor i against every positive and every negative of the batch
            logits = [-d(a[i], c) / temperature for c in [*p, *n]]
            out.append(-logits[i] + math.log(sum(math.exp(z) for z in logits)))
    return out


# ---------------------------------------------------------------- golden values by hand
def test_contrastive_triplet_golden() -> None:
    # cosine, margin 0.5:
    #   1: (0^2 + max(0, 0.5 - 1)^2) / 2 = 0
    #   2: ((1 - R)^2 + (0.5 - 0)^2) / 2 = (1.5 - 2R + 0.25) / 2 = 0.875 - R = 0.16789
    per = contrastive_triplet(A, P, N, margin=0.5, reduction="none")
    assert per.tolist() == pytest.approx([0.0, 0.875 - R], abs=1e-5)
    assert contrastive_triplet(A, P, N, margin=0.5).item() == pytest.approx((0.875 - R) / 2, abs=1e-5)
    # euclidean, margin 1:
    #   1: d(a,p) = 0, d(a,n) = sqrt 2 > 1            -> (0 + 0) / 2 = 0
    #   2: d(a,p) = ||[-1, 0]|| = 1, d(a,n) = 0       -> (1 + 1) / 2 = 1
    per = contrastive_triplet(A, P, N, margin=1.0, distance="euclidean", reduction="none")
    assert per.tolist() == pytest.approx([0.0, 1.0], abs=1e-5)


def test_info_nce_triplets_golden() -> None:
    # temperature 1, cosine: logits = cos - 1 (the shift cancels); candidates p1, p2, n1, n2.
    #   anchor 1 = [1,0]: cos 1, R, 0, 0; target p1 -> -1 + log(e + e^R + 2)      = 0.90901
    #   anchor 2 = [0,1]: cos 0, R, 1, 1; target p2 -> -R + log(1 + e^R + 2e)     = 1.42880
    expected = [-1 + math.log(E + math.exp(R) + 2), -R + math.log(1 + math.exp(R) + 2 * E)]
    assert expected == pytest.approx([0.90901, 1.42880], abs=1e-5)
    per = info_nce_triplets(A, P, N, temperature=1.0, reduction="none")
    assert per.tolist() == pytest.approx(expected, abs=1e-9)
    assert info_nce_triplets(A, P, N, temperature=1.0).item() == pytest.approx(sum(expected) / 2, abs=1e-9)
    # temperature 0.5 doubles every logit: anchor 1 -> -2 + log(e^2 + e^2R + 2)
    half = info_nce_triplets(A, P, N, temperature=0.5, reduction="none")
    assert half[0].item() == pytest.approx(-2 + math.log(E**2 + math.exp(2 * R) + 2), abs=1e-9)


def test_triplet_margin_golden_on_the_same_batch() -> None:
    # cosine, margin 0.2: 1: max(0, 0 - 1 + 0.2) = 0; 2: max(0, (1 - R) - 0 + 0.2) = 1.2 - R = 0.49289
    per = triplet_margin(A, P, N, margin=0.2, reduction="none")
    assert per.tolist() == pytest.approx([0.0, 1.2 - R], abs=1e-9)


def _item(t: torch.Tensor) -> dict[str, torch.Tensor]:
    # Every modality the same 2-D vectors, except text negated: i2t / t2i then differ from image / text.
    return {"image": t, "text": -t, "fused": 2 * t}


def test_siamese_objective_contrastive_golden() -> None:
    # loss="contrastive", cosine, margin 0.5; fused = 2 * image (cosine ignores scale), text = -image
    # (cos(-u, -v) = cos(u, v)): image = text = fused = mean(0, 0.875 - R) = 0.08395.
    # i2t: anchor image vs -positive, -negative: d = 1 - cos(u, -v) = 1 + cos(u, v)
    #   1: d(a, -p) = 2, d(a, -n) = 1: (4 + max(0, 0.5 - 1)^2) / 2 = 2
    #   2: d(a, -p) = 1 + R, d(a, -n) = 2: ((1 + R)^2 + 0) / 2 = (1.5 + 2R) / 2 = 0.75 + R
    #   -> i2t = (2 + 0.75 + R) / 2; t2i is the same by symmetry; cross = i2t
    # loss = image + text + fused + cross = 3 * (0.875 - R) / 2 + (2.75 + R) / 2
    out = siamese_objective(_item(A), _item(P), _item(N), margin=0.5, loss="contrastive")
    same = (0.875 - R) / 2
    cross = (2.75 + R) / 2
    expected = {"image": same, "text": same, "fused": same, "i2t": cross, "t2i": cross, "cross": cross}
    expected["loss"] = 3 * same + cross
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-5), key


# ---------------------------------------------------------------- loop references, every loss and term
def _rand_item(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 4, generator=g, dtype=torch.float64) for k in ("image", "text", "fused")}


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("loss", sorted(SIAMESE_LOSSES))
def test_siamese_objective_matches_loop_reference(loss: str, distance: str) -> None:
    a, p, n = _rand_item(1), _rand_item(2), _rand_item(3)
    weights = {"image": 0.5, "text": 1.0, "fused": 2.0, "cross": 0.25}
    out = siamese_objective(
        a, p, n, weights, margin=0.7, distance=distance, reduction="none", loss=loss, temperature=0.3
    )

    def ref(ka: str, kp: str) -> list[float]:
        return ref_terms(loss, a[ka].tolist(), p[kp].tolist(), n[kp].tolist(), 0.7, 0.3, distance)

    expected = {m: ref(m, m) for m in ("image", "text", "fused")}
    expected["i2t"], expected["t2i"] = ref("image", "text"), ref("text", "image")
    expected["cross"] = [(x + y) / 2 for x, y in zip(expected["i2t"], expected["t2i"], strict=True)]
    expected["loss"] = [
        0.5 * i + 1.0 * t + 2.0 * f + 0.25 * c
        for i, t, f, c in zip(
            expected["image"], expected["text"], expected["fused"], expected["cross"], strict=True
        )
    ]
    for key, values in expected.items():
        assert out[key].tolist() == pytest.approx(values, rel=1e-9, abs=1e-9), key
    module = SiameseLoss(loss, weights=weights, margin=0.7, distance=distance, temperature=0.3)(a, p, n)
    assert module["loss"].item() == pytest.approx(sum(expected["loss"]) / 3, rel=1e-9)


@pytest.mark.parametrize("loss", sorted(SIAMESE_LOSSES))
def test_every_siamese_loss_backward_is_finite_on_identical_items(loss: str) -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    item = {"image": x, "text": x, "fused": x}
    for distance in ("cosine", "euclidean"):
        out = siamese_objective(item, item, item, distance=distance, loss=loss)
        (grad,) = torch.autograd.grad(out["loss"], x)
        assert torch.isfinite(grad).all(), distance


def test_siamese_losses_are_the_configs_list_for_the_task() -> None:
    # config.py cannot import the losses (it sits below them); this keeps its list true.
    assert sorted(TASK_LOSSES["siamese"]) == sorted(SIAMESE_LOSSES)


def test_unknown_siamese_loss_and_bad_temperature_fail_early() -> None:
    with pytest.raises(
        ValueError, match=r"unknown Siamese loss 'siglip'; known: \['contrastive', 'info_nce'"
    ):
        SiameseLoss("siglip")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SiameseLoss("info_nce", temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce_triplets(A, P, N, temperature=-1.0)


def test_eval_recomputes_batch_dependent_info_nce_over_training_sized_batches() -> None:
    # 5 triplets, batch size 2: batches [0, 1], [2, 3], [4]; each triplet's InfoNCE sees only its batch's
    # candidates, as in training and validation (batched_term_means weights batches by size).
    from cliptune.evaluation.loss import LossSettings
    from cliptune.evaluation.triplets import triplet_values

    g = torch.Generator().manual_seed(7)
    a, p, n = ({k: torch.randn(5, 3, generator=g) for k in ("image", "text", "fused")} for _ in range(3))
    settings = LossSettings(temperature=0.5, batch_size=2, siamese_loss="info_nce")
    values = triplet_values(a, p, n, settings)["loss"]
    expected: list[float] = []
    for s in (slice(0, 2), slice(2, 4), slice(4, 5)):
        a_b, p_b, n_b = ({k: v[s].tolist() for k, v in item.items()} for item in (a, p, n))

        def term(ka: str, kp: str) -> list[float]:
            return ref_terms("info_nce", a_b[ka], p_b[kp], n_b[kp], 0.2, 0.5, "cosine")  # noqa: B023

        parts = [term(m, m) for m in ("image", "text", "fused")] + [
            term("image", "text"),
            term("text", "image"),
        ]
        expected += [i + t + f + (x + y) / 2 for i, t, f, x, y in zip(*parts, strict=True)]
    assert values.tolist() == pytest.approx(expected, rel=1e-5)


def test_check_messages_name_the_function_the_role_and_the_choices() -> None:
    item = {k: A for k in ("image", "text", "fused")}
    known_losses = r"\['contrastive', 'info_nce', 'triplet'\]"
    known_weights = r"\['cross', 'fused', 'image', 'text'\]"
    for where, call in (
        ("siamese_objective", lambda **kw: siamese_objective(item, item, item, **kw)),
        ("SiameseLoss", lambda **kw: SiameseLoss(**kw)),
    ):
        with pytest.raises(
            ValueError, match=rf"^{where}: unknown Siamese loss 'hinge'; known: {known_losses}$"
        ):
            call(loss="hinge")
        with pytest.raises(
            ValueError, match=rf"^{where}: unknown weight key\(s\) \['audio'\]; known: {known_weights}$"
        ):
            call(weights={"audio": 1.0})
    for role in ("anchor", "positive", "negative"):
        items = {"anchor": item, "positive": item, "negative": item, role: {"image": A}}
        with pytest.raises(
            ValueError,
            match=rf"^siamese_objective: {role} lacks key\(s\) \['text', 'fused'\]; it needs "
            r"\['image', 'text', 'fused'\]$",
        ):
            siamese_objective(items["anchor"], items["positive"], items["negative"])
