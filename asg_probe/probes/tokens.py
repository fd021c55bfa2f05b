"""Which tokens a probe reads: each layer's output as is, or after the model's final norm.

The linear probes (:func:`~asg_probe.layerwise_probes`) and the MLP probe read the same view by
default (``"pre_norm"``), so "linear vs non-linear decodability" is not confounded by the norm.
"""
from __future__ import annotations

__all__ = ["TOKENS", "final_norm"]

#: Which tokens a probe reads: each layer's output as is (``"pre_norm"``, the default of the
#: linear and the MLP probe alike) or after the model's final norm (``"post_norm"``).
TOKENS = ("pre_norm", "post_norm")


def final_norm(model, tokens="pre_norm"):
    """The module that maps a layer's tokens to the ones a probe reads: ``None`` for ``"pre_norm"``,
    the model's final norm (timm ``norm``, the Hugging Face wrapper's ``_norm``) for ``"post_norm"``.

    Post-norm tokens of the last layer are ``forward_features``' patch tokens; earlier layers get
    the same norm (timm's ``forward_intermediates(norm=True)`` convention).

    Examples
    --------
    >>> import asg_probe
    >>> m = asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=1)
    >>> final_norm(m) is None, final_norm(m, "post_norm") is m.norm
    (True, True)
    """
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {', '.join(TOKENS)}; got {tokens!r}")
    if tokens == "pre_norm":
        return None
    norm = getattr(model, "norm", None) or getattr(model, "_norm", None)
    if norm is None:
        raise ValueError(f"tokens='post_norm' needs the model's final norm, but {type(model).__name__} has no "
                         f"'norm' attribute; use tokens='pre_norm'")
    return norm
