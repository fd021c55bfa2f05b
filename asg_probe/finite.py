"""One finite-check: a NaN or an infinity in a model is an input error, never a result.

A NaN weight makes every output NaN; an analysis that compares NaNs (``abs(a - b) <= tol``
is False, ``max`` of a NaN list is undefined, a mean is NaN) could then print a table of NaN or,
worse, a verdict. So weights are checked once when a checkpoint is loaded, and what an
analysis computes from activations is checked before it becomes a result: both raise
:class:`~asg_probe.errors.InputError` naming the source and the first tensor (or layer)
where a non-finite value appears.

Examples
--------
>>> import torch
>>> first_non_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
'b'
>>> require_finite({"a": torch.ones(2)}, source="ckpt.pt")
>>> require_finite({"blocks.0.w": torch.tensor([float("inf")])}, source="ckpt.pt")
Traceback (most recent call last):
...
asg_probe.errors.InputError: ckpt.pt: non-finite values (NaN or inf) in blocks.0.w; no result is computed from a broken model: re-export or retrain it
"""
from __future__ import annotations

from .errors import InputError

__all__ = ["first_non_finite", "require_finite", "model_source"]


def model_source(model) -> str:
    """How an error names a model: its checkpoint when it was loaded from one, else its class."""
    meta = getattr(model, "asg_meta", None)
    checkpoint = meta.get("checkpoint") if isinstance(meta, dict) else None
    return str(checkpoint) if checkpoint else type(model).__name__


def _finite(value) -> bool:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()):
            return True
        return bool(torch.isfinite(value).all())
    array = np.asarray(value)
    if array.dtype.kind not in "fc":
        return True
    return bool(np.isfinite(array).all())


def first_non_finite(named):
    """The name of the first entry of ``named`` (a mapping or ``(name, value)`` pairs of tensors,
    arrays or numbers) holding a NaN or an infinity, or ``None``."""
    import torch

    items = [(n, v) for n, v in (named.items() if hasattr(named, "items") else named) if v is not None]
    floating = [v for _, v in items if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())]
    if floating and len(floating) == len(items) and len({v.device for v in floating}) == 1:
        # tensors on one device: one flag per tensor, one host sync for all of them
        if bool(torch.stack([torch.isfinite(v).all() for v in floating]).all()):
            return None
    for name, value in items:
        if not _finite(value):
            return name
    return None


def require_finite(named, *, source, what: str = "", hint: str = "no result is computed from a broken "
                   "model: re-export or retrain it", error=InputError) -> None:
    """Raise ``error`` (an :class:`~asg_probe.errors.InputError`) if any entry of ``named`` is not finite.

    ``source`` names the checkpoint (or model); ``what`` prefixes the entry's name (``"layer "``).
    """
    bad = first_non_finite(named)
    if bad is not None:
        raise error(f"{source}: non-finite values (NaN or inf) in {what}{bad}; {hint}")
