"""``asg_train``: the matched ASG training protocol for every positional mechanism.

The source folder is ``train/``; it installs as the package ``asg_train`` (no top-level
``train`` module, which would collide with a user's own ``train.py``). ``asg_train``
imports ``asg_probe`` (models, guidance head, checkpoint format, atomic files); nothing in
``asg_probe`` imports ``asg_train``.

Entry points: ``asg-train`` / ``python -m asg_train`` (:mod:`asg_train.cli`), the loop
(:mod:`asg_train.trainer`), one object per task (:mod:`asg_train.tasks`), the reference
set (``python -m asg_train.reference``) and the benchmark (``python -m asg_train.bench``).

Layout: ``config`` (defaults ← recipe ← overrides, validation), ``data`` / ``dense_data``
(datasets and the resumable batch plan), ``modules`` (backbone + heads + losses as one
module), ``dense`` (segmentation/depth heads and metrics), ``evaluate`` (the evaluation loop
and metric accumulators), ``build`` (device, model, optimiser groups), ``state``
(``train_state.pt``), ``snapshots`` (inference-only snapshots during training), ``runlog``
(metrics log, progress bars), ``schedule``, ``dist``, ``summary``.
"""
