"""Ship a run's model: ONNX graphs with a parity check, the plain model folder, the model card, hub push.

The package sits above ``evaluation``, ``report`` and ``search`` (the card reads a run's metrics and suite
verdicts) and below ``cli``. See ``docs/export.md``.
"""
