"""asg_probe: see, layer by layer, how Vision Transformers know where each patch is.

The package import is deliberately light: only torch and timm are imported here.
Analyses, plotting, UMAP, captum and widgets load on first use.

Examples
--------
>>> import asg_probe
>>> model = asg_probe.create_model("vit_tiny_patch4_32", pos="none")
>>> "sdt-decay" in asg_probe.list_positions()
True
"""
from importlib import import_module

__version__ = "0.1.0"

# name -> module that defines it; resolved lazily by __getattr__ so that
# `import asg_probe` never pulls in scikit-learn, umap, captum or matplotlib.
_LAZY = {
    "create_model": "asg_probe.models",
    "list_models": "asg_probe.models",
    "list_positions": "asg_probe.models",
    "SpatialViT": "asg_probe.models",
    "GuidanceHead": "asg_probe.layers.guidance",
    "save_checkpoint": "asg_probe.checkpoint",
    "load_checkpoint": "asg_probe.checkpoint",
    "CheckpointError": "asg_probe.checkpoint",
    "load_images": "asg_probe.data",
    "embedded_images": "asg_probe.data",
    "CoordinateProbe": "asg_probe.probes",
    "layerwise_probes": "asg_probe.analysis.layerwise",
    "mlp_layer_probe": "asg_probe.analysis.layerwise",
    "attention_distance": "asg_probe.analysis.attention_distance",
    "attention_offsets": "asg_probe.analysis.attention_offsets",
    "token_embeddings": "asg_probe.analysis.embeddings",
    "pos_similarity": "asg_probe.analysis.pos_similarity",
    "shuffle_test": "asg_probe.analysis.shuffle",
    "check_equivariance": "asg_probe.analysis.equivariance",
    "resolution_transfer": "asg_probe.analysis.resolution",
    "probe_attribution": "asg_probe.analysis.attribution",
    "emergence": "asg_probe.analysis.emergence",
    "collect_activations": "asg_probe.activations",
    "erase_position": "asg_probe.analysis.erasure",
    "run_with_cache": "asg_probe.hooks",
    "run_with_hooks": "asg_probe.hooks",
    "iter_activations": "asg_probe.hooks",
    "hook_points": "asg_probe.hooks",
    "ActivationCache": "asg_probe.activations",
    "list_reference_models": "asg_probe.reference",
    "load_reference_model": "asg_probe.reference",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'asg_probe' has no attribute {name!r}")


def __dir__():
    return __all__
