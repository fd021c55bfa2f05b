"""Interactive widgets (ipywidgets) to compare how models represent patch position.

* :class:`ComparisonExplorer`: models side by side; choose a layer, a head, a query
  patch and an image; see the attention map over the image, the probe's predicted
  position of every patch, and a UMAP of the layer's tokens.
* :class:`LayerSlider`: a play button through depth, showing each model's probe
  field and R² curve as spatial organisation emerges.
* :class:`TrainingExplorer`: the comparison explorer with a training-step slider
  (and play) over runs' snapshots, loaded as the slider reaches them.
* :class:`OffsetKernelViewer`: pick a layer and a head, see its attention offset
  kernel (from :func:`asg_probe.attention_offsets`).
* :class:`ModelView`: the per-model cache both are built on (tokens, probes,
  attention, embeddings, computed on first use).

Only this module imports ipywidgets (and, on first UMAP, umap-learn); ``import
asg_probe`` stays light.

Examples
--------
>>> import asg_probe
>>> from asg_probe.widgets import ComparisonExplorer
>>> models = {p: asg_probe.create_model("vit_tiny_patch4_32", pos=p, depth=2) for p in ("none", "ape")}
>>> explorer = ComparisonExplorer(models, num_images=8, embedding="pca")
>>> explorer.layer.value = 0          # what the notebook slider does
>>> float(explorer.last_render["ape"]["r2"]) > 0.9
True
"""
from .explorer import MEAN_HEAD, ComparisonExplorer
from .layer_slider import LayerSlider
from .offsets import OffsetKernelViewer
from .training import RunSnapshots, TrainingExplorer
from .view import Embedding2D, ModelView, ProbeFit, as_views

__all__ = ["ComparisonExplorer", "LayerSlider", "OffsetKernelViewer", "TrainingExplorer", "RunSnapshots", "ModelView", "ProbeFit",
           "Embedding2D", "MEAN_HEAD", "as_views"]
