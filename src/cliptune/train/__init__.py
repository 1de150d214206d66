"""Training: a config in, a run directory out.

* :mod:`~cliptune.train.run`: :func:`~cliptune.train.run.train` builds the run (config, data, backbone,
  task, Accelerate, trackers), calls the loop and writes ``summary.json``.
* :mod:`~cliptune.train.loop`: :func:`~cliptune.train.loop.fit`, the task-agnostic training loop.
* :mod:`~cliptune.train.state`: where the loop is (``LoopState``) and ``metrics.jsonl`` (``MetricsLog``).
* :mod:`~cliptune.train.checkpoint`: resumable checkpoints, the ``latest`` pointer, ``model/``.
* :mod:`~cliptune.train.failures`: Ctrl-C / SIGTERM, out-of-memory and non-finite-loss guards.
* :mod:`~cliptune.train.errors`: ``TrainingError`` and its subclasses, which carry the facts.
* :mod:`~cliptune.train.batches`, :mod:`~cliptune.train.optim`, :mod:`~cliptune.train.early_stopping`,
  :mod:`~cliptune.train.progress`, :mod:`~cliptune.train.trackers`: what the loop uses per step and epoch.
* :mod:`~cliptune.train.tasks`: the tasks (retrieval, siamese) as a ``TaskBundle``.

Nothing is imported here, so ``import cliptune.train.errors`` stays cheap. (This file also makes
``cliptune.train`` a regular package, which setuptools' ``packages.find`` needs to ship it in a wheel.)
"""
