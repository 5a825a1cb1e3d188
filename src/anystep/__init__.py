"""anystep: train any-step video generators with AnyFlow (on-policy flow-map distillation).

The package is mostly used through its CLI (``anystep --help``) and submodules; the names below are the
top-level helpers, imported on first use (``import anystep`` stays light).

* :func:`patch_far_pipeline`: make diffusers' ``AnyFlowFARPipeline`` sample an exported causal model
  correctly (``anystep.models.far``).
"""

__all__ = ["patch_far_pipeline"]


def __getattr__(name: str):
    if name == "patch_far_pipeline":
        from .models.far_attention import patch_far_pipeline
        return patch_far_pipeline
    raise AttributeError(f"module 'anystep' has no attribute {name!r}")
