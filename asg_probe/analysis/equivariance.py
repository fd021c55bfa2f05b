"""The equivariance certificate: does a model inject position at all?

A model with no positional injection is permutation-equivariant: shuffling the
input patches shuffles the patch tokens the same way, at every layer, up to the
rounding of a different summation order. :func:`check_equivariance` measures the
difference directly and says what it checked:

* it runs in **float64** by default, on a copy of the model cast for the check
  (the user's model is left as it is), so the rounding floor is ~1e-16, not ~1e-7;
* the **tolerance** of layer ``l`` is derived from that floor and the depth, not a
  constant: :func:`rounding_tolerance`, ``16 eps (l + 1) sqrt(max(N, 64) / 64)``
  (``eps`` of the dtype, ``N`` patches). Measured floors: at most 4 eps after the 4
  trained blocks of the bundled models, 1.6 eps after 12 random blocks, 0 at layer 0;
* the verdict prints the **measured bound**: certified means no per-slot injection
  above the largest error measured (an injection of relative size ``d`` shows as an
  error of about ``d`` where it enters), and a refusal names the first layer whose
  error exceeds its tolerance.

Which mechanisms can be certified
--------------------------------
Only those that inject nothing are permutation-equivariant by construction: ``pos="none"``,
and Active Spatial Guidance (a training-only loss on the final tokens; the exported model is a
``none`` model, e.g. the bundled ``guidance``, ``guidance-random`` and ``guidance-shuffled``).
Every other mechanism is refused, correctly: ``ape`` and ``sincos`` add a per-slot vector, and
every relative mechanism (``rope-axial``, ``rope-mixed``, ``rope-dinov3``, ``alibi2d``,
``relpos``, ``rmt-decay``, ``sdt-decay``) makes attention a function of the slots' geometry, so
shuffling the patches changes what attention sees. A refusal does not mean a probe can read
the slot: a decay that depends only on the distance between two slots tells a token how far the
others are, not where it is itself, and the shuffle test (:func:`asg_probe.shuffle_test`) of the
bundled ``sdt-decay`` finds its slot undecodable (``r2_slot`` ≈ 0). The certificate answers
"is there any positional injection?", the shuffle test "can a linear probe read the slot?".

Examples
--------
>>> import asg_probe, torch
>>> cert = check_equivariance(asg_probe.create_model("vit_tiny_patch4_32", pos="none", depth=2),
...                           torch.randn(2, 3, 32, 32))
>>> cert.certified, cert.dtype
(True, 'float64')
"""
from __future__ import annotations

import copy
import math

import torch

from ..errors import UsageError
from ..finite import require_finite
from ..results import AnalysisResult

__all__ = ["EquivarianceResult", "check_equivariance", "rounding_tolerance", "ROUNDING_SAFETY"]

#: Tolerance per layer in units of the dtype's machine epsilon, before the depth and width factors:
#: about 4x the largest reordering error measured per layer (see the module docstring).
ROUNDING_SAFETY = 16


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype such as torch.float64, got {dtype!r}")
    return dtype


def rounding_tolerance(layer: int, dtype=torch.float64, num_patches: int = 64) -> float:
    """Largest relative error rounding alone may leave at ``layer``: ``16 eps (layer + 1) sqrt(max(N, 64) / 64)``.

    Each block may add a few ``eps`` of reordering error (attention sums its ``N`` keys
    in another order), so the bound grows linearly with depth and with ``sqrt(N)``.

    Examples
    --------
    >>> f"{rounding_tolerance(0):.2e}", f"{rounding_tolerance(3, 'float32'):.2e}"
    ('3.55e-15', '7.63e-06')
    """
    eps = torch.finfo(_as_dtype(dtype)).eps
    return ROUNDING_SAFETY * eps * (int(layer) + 1) * math.sqrt(max(int(num_patches), 64) / 64)


class EquivarianceResult(AnalysisResult):
    """Per-layer relative error between shuffled outputs and shuffled original outputs, and its tolerance.

    Attributes
    ----------
    rows : list of dict
        ``layer``, ``max_rel_error`` (largest ``|out - shuffled ref|`` over the largest
        ``|ref|``), ``tol`` (that layer's tolerance) and ``equivariant``.
    dtype : str
        Precision of the check.
    tol : float
        The largest tolerance of any layer.
    """

    name = "equivariance"

    def __init__(self, rows, num_images, num_permutations, checkpoint="", dtype="float64"):
        self.rows = rows
        self.num_images = num_images
        self.num_permutations = num_permutations
        self.checkpoint = checkpoint
        self.dtype = str(dtype)

    @property
    def tol(self) -> float:
        return max(r["tol"] for r in self.rows)

    @property
    def max_rel_error(self) -> float:
        return max(r["max_rel_error"] for r in self.rows)

    @property
    def certified(self) -> bool:
        """True when every layer is equivariant within its tolerance: no positional injection."""
        return bool(self.rows) and all(r["equivariant"] is True for r in self.rows)

    def verdict(self) -> str:
        setting = f"{self.dtype}, {self.num_images} images x {self.num_permutations} permutations"
        if self.certified:
            tols = sorted({r["tol"] for r in self.rows})
            span = f"{tols[0]:.1e}" if len(tols) == 1 else f"{tols[0]:.1e} to {tols[-1]:.1e} by layer"
            return (f"CERTIFIED equivariant ({setting}): no positional injection above {self.max_rel_error:.1e} "
                    f"relative (the largest error measured; tolerance {span})")
        first = next(r for r in self.rows if not r["equivariant"])
        return (f"NOT equivariant ({setting}): position is injected (layer {first['layer']} relative error "
                f"{first['max_rel_error']:.1e} > tolerance {first['tol']:.1e})")

    def to_dict(self):
        return {"checkpoint": self.checkpoint, "certified": self.certified, "tol": self.tol, "dtype": self.dtype,
                "max_rel_error": self.max_rel_error, "num_images": self.num_images,
                "num_permutations": self.num_permutations, "verdict": self.verdict(), "layers": self.rows}

    def plot(self, ax=None):
        from ..plotting import integer_ticks, new_figure

        if ax is None:
            fig, axes = new_figure(5.0, 3.2)
            ax = axes[0][0]
        layers = [r["layer"] for r in self.rows]
        floor = torch.finfo(_as_dtype(self.dtype)).eps / 4  # where a zero error is drawn
        errors = [max(r["max_rel_error"], floor) for r in self.rows]
        # black, not green/red: those are model colours (rope-axial, guidance) in every other figure
        ax.semilogy(layers, errors, marker="o" if self.certified else "X", color="k",
                    label="max relative error")
        ax.semilogy(layers, [r["tol"] for r in self.rows], ls="--", color="k", lw=0.8,
                    label=f"tolerance ({self.dtype} rounding x depth)")
        ax.set_xlabel("layer (0 = patch embedding)")
        ax.set_ylabel("max relative error")
        integer_ticks(ax, layers)
        ax.set_title(("certified equivariant" if self.certified else "not equivariant")
                     + (f" — {self.checkpoint}" if self.checkpoint else ""), fontsize=9)
        ax.legend(fontsize=7)
        ax.figure.tight_layout()
        return ax.figure


def check_equivariance(model, images=None, *, num_images=8, img_size=None, batch_size=8, num_permutations=2,
                       tol=None, dtype=torch.float64, seed=0, device="cpu", progress=False, label="",
                       checkpoint=None):
    """Certify (or refute) that ``model`` has no positional injection.

    Shuffles each image's patches and checks, at every layer, that output token
    ``s`` equals the unshuffled output token ``perm[s]`` within a tolerance relative
    to the largest token entry.

    Parameters
    ----------
    model : nn.Module
        Left untouched: the check runs on a copy cast to ``dtype``.
    images, num_images, img_size, batch_size, seed, device, progress
        As in :func:`asg_probe.layerwise_probes` (``seed`` also seeds the permutations).
    num_permutations : int
        Random patch permutations per image.
    tol : float, optional
        One relative tolerance for every layer; by default each layer's
        :func:`rounding_tolerance` for ``dtype``, depth and patch count.
    dtype : torch.dtype or str, default=torch.float64
        Precision of the check. In float32 the floor is ~1e-7, so injections below
        about 1e-5 relative go unseen.
    label : str
        Display name stored in the result (its JSON ``checkpoint`` field).
    checkpoint : str, optional
        Deprecated alias of ``label``.

    Returns
    -------
    EquivarianceResult

    Examples
    --------
    >>> import asg_probe, torch
    >>> check_equivariance(asg_probe.create_model("vit_tiny_patch4_32", pos="ape"), torch.randn(2, 3, 32, 32)).certified
    False
    """
    from ..extract import forward_tokens, image_permutations
    from ..geometry import model_geometry
    from ..inputs import ImageBatches, display_label
    from ..layers.grid import permute_patches
    from ..progress import progress_bar

    label = display_label(label, checkpoint)
    dtype = _as_dtype(dtype)
    if tol is not None and not (float(tol) > 0 and math.isfinite(float(tol))):
        raise UsageError(f"tol must be a positive number, got {tol!r}")
    data = ImageBatches.prepare(model, images, num_images=num_images, img_size=img_size,
                                batch_size=batch_size, seed=seed)
    patch = model_geometry(model).patch_size
    work = copy.deepcopy(model).to(device=device, dtype=dtype).eval()  # the caller's model keeps its dtype
    worst, num_patches = {}, 1
    for images_b, index in progress_bar(data, total=len(data), desc="equivariance", unit="batch",
                                        disable=not progress, leave=False):
        images_b = images_b.to(device=device, dtype=dtype)
        grid = (images_b.shape[-2] // patch, images_b.shape[-1] // patch)
        num_patches = grid[0] * grid[1]
        ref = forward_tokens(work, images_b)
        # a NaN error compares as "not larger" than any worst-so-far: it must stop the check instead
        require_finite(ref, source=label or "model", what="the tokens of layer ")
        for k in range(num_permutations):
            perm = image_permutations(index, num_patches, seed=seed * 7919 + k + 1).to(device)
            out = forward_tokens(work, permute_patches(images_b, patch, perm))
            require_finite(out, source=label or "model", what="the tokens (shuffled input) of layer ")
            for layer in ref:
                expected = torch.gather(ref[layer], 1, perm[:, :, None].expand_as(ref[layer]))
                scale = ref[layer].abs().max().clamp_min(torch.finfo(dtype).tiny)
                err = ((out[layer] - expected).abs().max() / scale).item()
                worst[layer] = max(worst.get(layer, 0.0), err)
    rows = []
    for layer, err in sorted(worst.items()):
        limit = float(tol) if tol is not None else rounding_tolerance(layer, dtype, num_patches)
        rows.append({"layer": layer, "max_rel_error": err, "tol": limit, "equivariant": err <= limit})
    result = EquivarianceResult(rows, data.num_images, num_permutations, checkpoint=label,
                                dtype=str(dtype).replace("torch.", ""))
    return result.record_inputs(data, device=device)
