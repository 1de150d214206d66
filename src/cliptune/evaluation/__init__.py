"""One evaluator for training validation (no intervals) and ``cliptune eval`` (with intervals)."""
