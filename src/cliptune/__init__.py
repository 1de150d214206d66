"""cliptune: fine-tune, evaluate, gate and compare CLIP-family image-text models."""

__version__ = "0.1.0"
__all__ = ["__version__"]
