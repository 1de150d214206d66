"""Tiny CLIP / SigLIP models and a tiny tokenizer, built from configs and saved locally.

No hub access is possible in tests, so every model here is randomly initialised from a small
config (hidden 32, 2 layers, 32 px images, 8 px patches) and written with ``save_pretrained``
together with an image processor and a word-piece-free BPE tokenizer trained on a few sentences.
Other test modules reuse these helpers; keep them plain functions.

Example:
    >>> path = make_tiny_clip(tmp_path / "clip")
    >>> backbone = load_backbone(path)
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

__all__ = ["TINY_CORPUS", "make_tiny_clip", "make_tiny_siglip", "make_tiny_tokenizer"]

# Special token ids are fixed by the order of ``special_tokens`` in the trainer.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
IMAGE_SIZE = 32
MAX_TEXT_LEN = 16

TINY_CORPUS = [
    "a photo of a cat",
    "a photo of a dog",
    "a cup of coffee",
    "an astronaut in a white suit",
    "a rocket on the launch pad",
    "ripped blue jeans",
    "a red dress with white dots",
    "a black leather jacket",
    "an abstract painting in green and yellow",
    "a horse in a field",
]


def make_tiny_tokenizer(vocab_size: int = 200, max_length: int = MAX_TEXT_LEN) -> PreTrainedTokenizerFast:
    """Train a tiny BPE tokenizer on ``TINY_CORPUS`` and wrap it for transformers.

    Args:
        vocab_size: BPE vocabulary size (special tokens included).
        max_length: ``model_max_length``; texts are truncated to it.

    Returns:
        A fast tokenizer that adds ``<bos> ... <eos>`` and pads with ``<pad>`` (id 0), so CLIP's
        EOS pooling (``eos_token_id`` = 3) finds the end of every text.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def _tower_sizes() -> dict[str, int]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }


def make_tiny_clip(path: Path, seed: int = 0, projection_dim: int = 24) -> Path:
    """Build a random tiny ``CLIPModel`` and save it with an image processor and tokenizer.

    Args:
        path: Output folder (created).
        seed: Torch seed for the random weights, so two calls give identical models.
        projection_dim: Size of the shared embedding space (distinct from hidden 32 so shape bugs show).

    Returns:
        ``path``, a folder loadable by ``CLIPModel.from_pretrained`` and ``load_backbone``.
    """
    tokenizer = make_tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            **_tower_sizes(),
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_TEXT_LEN,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        },
        vision_config={**_tower_sizes(), "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return _save(path, model, processor, tokenizer)


def make_tiny_siglip(path: Path, seed: int = 0) -> Path:
    """Build a random tiny ``SiglipModel`` (MAP head on) and save it with processor and tokenizer.

    Args:
        path: Output folder (created).
        seed: Torch seed for the random weights.

    Returns:
        ``path``, a folder loadable by ``SiglipModel.from_pretrained`` and ``load_backbone``.
    """
    tokenizer = make_tiny_tokenizer()
    config = SiglipConfig(
        text_config={
            **_tower_sizes(),
            "vocab_size": len(tokenizer),
            "max_position_embeddings": MAX_TEXT_LEN,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "projection_size": 32,
        },
        vision_config={**_tower_sizes(), "image_size": IMAGE_SIZE, "patch_size": 8},
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(path, model, processor, tokenizer)


def _save(path: Path, model: torch.nn.Module, processor: object, tokenizer: PreTrainedTokenizerFast) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
