"""Hints the CLI adds to library errors that need more than the message's facts to act on."""

from __future__ import annotations

from cliptune.cli.errors import with_hint
from cliptune.evaluation.errors import NonFiniteEmbeddingsError


def _nan(precision: str) -> NonFiniteEmbeddingsError:
    return NonFiniteEmbeddingsError("test", "abc123", "runs/x/model", "image", 3, 10, "a.jpg", precision)


def test_non_finite_embeddings_hint_says_how_to_find_and_avoid_the_divergence() -> None:
    message = with_hint(_nan("fp32"))
    facts, _, hint = message.partition("at precision 'fp32': ")
    assert facts.startswith(
        "cannot evaluate split 'test' with model abc123 (runs/x/model): 3 of its 10 image"
    )
    assert hint == (
        "if the model is a training run, find the step where its loss became NaN or grew in its "
        "metrics.jsonl and train it again with a lower train.lr, train.grad_clip on (e.g. "
        "--set train.grad_clip=1.0) or more train.warmup_steps; if its weights file may be damaged, restore "
        "or retrain it"
    )


def test_non_finite_embeddings_hint_suggests_fp32_only_below_it() -> None:
    for precision in ("bf16", "auto"):
        assert with_hint(_nan(precision)).endswith(
            "restore or retrain it; to rule out overflow, embed at fp32 (model.embed_precision)"
        )
    assert "embed at fp32" not in with_hint(_nan("fp32"))
