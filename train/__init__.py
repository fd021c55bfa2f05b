"""Training package for asg_probe: the matched ASG protocol for every positional mechanism.

``train`` imports ``asg_probe`` (models, guidance head, checkpoint format); nothing in
``asg_probe`` imports ``train``. Entry points: ``asg-train`` / ``python -m train``
(:mod:`train.cli`), the loop (:mod:`train.trainer`), and the benchmark (:mod:`train.bench`).
"""
