"""The training tasks: each builds a :class:`~cliptune.train.tasks.bundle.TaskBundle` for the loop.

``retrieval`` (text-image contrastive) and ``siamese`` (triplets); imported on demand by
:mod:`cliptune.train.run`, so a run loads only the task it trains.
"""
