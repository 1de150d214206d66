"""The exported graphs as small modules: exactly what ``models.embed`` computes, one entry point each.

* image: pixels (B, 3, H, W) -> (B, D) L2-normalised, as ``embed_images_with``: ``encode_image``, or
  for a Siamese model the tower features through the head with the text masked out (the searchable
  embedding a client wants, so it never needs the head graph for search).
* text: ``input_ids`` / ``attention_mask`` (B, T) -> (B, D) L2-normalised, as ``embed_texts_with``.
* head (Siamese only): tower features ``image_features`` (B, Fi) and ``text_features`` (B, Ft) of items
  that have both -> ``image`` / ``text`` / ``fused`` (B, D), as ``siamese_embeddings``: the head on
  its own, for clients that already hold tower features (triplet scoring, fused item embeddings).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cliptune.models.backbone import Backbone
from cliptune.models.siamese import SiameseHead

__all__ = ["HeadGraph", "ImageGraph", "TextGraph"]


class ImageGraph(nn.Module):
    """Pixels -> the final image embedding. Shapes: (B, 3, H, W) -> (B, D)."""

    def __init__(self, backbone: Backbone, head: SiameseHead | None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.head is None:
            out = self.backbone.encode_image(pixel_values)
        else:
            feats = self.backbone.image_features(pixel_values)  # (B, Fi)
            text = feats.new_zeros(feats.shape[0], self.head.text_proj.in_features)
            present = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
            out = self.head(feats, text, has_image=present, has_text=~present).image
        return nn.functional.normalize(out.float(), dim=-1)


class TextGraph(nn.Module):
    """Token ids and mask -> the final text embedding. Shapes: (B, T) -> (B, D)."""

    def __init__(self, backbone: Backbone, head: SiameseHead | None) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.head is None:
            out = self.backbone.encode_text(input_ids, attention_mask)
        else:
            feats = self.backbone.text_features(input_ids, attention_mask)  # (B, Ft)
            image = feats.new_zeros(feats.shape[0], self.head.image_proj.in_features)
            present = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
            out = self.head(image, feats, has_image=~present, has_text=present).text
        return nn.functional.normalize(out.float(), dim=-1)


class HeadGraph(nn.Module):
    """The Siamese head on items with both modalities. Shapes: (B, Fi), (B, Ft) -> 3 x (B, D)."""

    def __init__(self, head: SiameseHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.head(image_features, text_features)
        return out.image, out.text, out.fused
