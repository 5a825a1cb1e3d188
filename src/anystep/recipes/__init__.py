"""Recipes: what the command line runs, callable from Python. Each wires components (worlds, models, kinds, the
loop) into one job: train a run, sweep runs over N, sample one, run the demo, export a student, report on a run."""

from ..build import build_trainer, load_model
from .demo import demo, demo_configs
from .export import export_run, teacher_transformer
from .report import Report, report
from .sample import sample_run
from .sweep import SweepResult, sweep
from .train import train

__all__ = ["Report", "SweepResult", "build_trainer", "demo", "demo_configs", "export_run", "load_model", "report",
           "sample_run", "sweep", "teacher_transformer", "train"]
