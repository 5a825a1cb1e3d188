"""anystep: train any-step video generators with AnyFlow (on-policy flow-map distillation).

The command line (``anystep --help``) and this small Python API do the same jobs; the names below are imported
on first use, so ``import anystep`` stays light.

* :func:`load` a trained run (a run or checkpoint folder, ``shipped:<name>``) as a :class:`Model`: call it as a
  flow map ``model(x_t, t, r, cond)``, draw :class:`Samples` at any N (``model.sample(steps=N)``), score them
  with its world's judge (``model.score(samples)``), ``samples.save(FILE)`` and :func:`load_samples` back.
* :func:`resolve` a run config (a preset or YAML file and dotted overrides), :func:`train_run` it (the
  ``anystep teacher|stage1|stage2|...`` commands), :func:`sweep` runs over N, :func:`export_run` a student as a
  diffusers folder (``anystep.train`` and ``anystep.export`` are the subpackage and module that do the work).
* :func:`patch_far_pipeline`: make diffusers' ``AnyFlowFARPipeline`` sample an exported causal model
  correctly (``anystep.models.far``).
"""

from importlib import import_module

# public name -> (module, attribute)
_EXPORTS = {
    "load": ("api", "load"),
    "Model": ("api", "Model"),
    "Samples": ("api", "Samples"),
    "load_samples": ("api", "load_samples"),
    "resolve": ("config", "resolve"),
    "train_run": ("recipes", "train"),
    "sweep": ("recipes", "sweep"),
    "export_run": ("recipes", "export_run"),
    "patch_far_pipeline": ("models.far_attention", "patch_far_pipeline"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        return getattr(import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'anystep' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
