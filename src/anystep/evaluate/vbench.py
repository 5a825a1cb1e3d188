"""VBench as an optional hook: name sampled videos as VBench expects them and run its dimensions on them.

VBench (github.com/Vchitect/VBench, ``pip install vbench``) needs torchvision, CUDA and a dozen model weights,
and pins an old transformers (4.33; AnyFlow's fork 4.49): it never goes into anystep's CPU environment. It runs in a separate environment on
a GPU machine, where this module needs only the standard library and vbench itself
(``PYTHONPATH=<anystep>/src python -m anystep.evaluate.vbench VIDEOS --out DIR --dimensions ...``); the videos
are written beforehand, in anystep's environment, by :func:`write_vbench_videos`.

The official AnyFlow protocol (NVlabs/AnyFlow ``far/data/vbench_t2v_dataset.py``, ``far/metrics/vbench.py``):
the 946 prompts of VBench's full-info JSON, each generated from its *extended* prompt (``aug_prompt_en``, in
AnyFlow's ``assets/data/meta/vbench/VBench_aug_full_info.json``), 5 samples per prompt (seed = the sample's
global index), 4 sampling steps, 16 fps, files named ``{prompt_en}-{index}.mp4``; all 16 dimensions, each
evaluated on its own (``VBench.evaluate(..., dimension_list=[dim], local=True)``), then Quality, Semantic and
Total as VBench's leaderboard computes them (:func:`vbench_total`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

# VBench's 16 text-to-video dimensions, Quality first, then Semantic (vbench/__init__.py, scripts/constant.py)
QUALITY_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                      "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC_DIMENSIONS = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship",
                       "scene", "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
# need the prompt suite's metadata (object, colour, relation...): VBench refuses them on custom prompts
NEEDS_SUITE = frozenset({"object_class", "multiple_objects", "scene", "appearance_style", "color",
                         "spatial_relationship"})
# the leaderboard's min-max range per dimension and its weight (VBench scripts/constant.py); others: [0, 1], 1
NORMALIZATION = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
                 "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
                 "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855), "temporal_style": (0.0, 0.364),
                 "overall_consistency": (0.0, 0.364)}
WEIGHTS = {"dynamic_degree": 0.5}
QUALITY_SHARE = 0.8                    # Total = 0.8 Quality + 0.2 Semantic (weights 4 : 1)
MODES = ("vbench_standard", "custom_input")
SAMPLES_PER_PROMPT = 5                 # the protocol's samples per prompt (VBench looks for indices 0..4)
FPS = 16                               # Wan2.1's frame rate, what AnyFlow writes

INSTALL = """VBench is not installed in this Python environment. It needs CUDA, torchvision and an old
transformers (4.33, the fork 4.49), so it never goes next to anystep's CPU environment: on a GPU machine make a separate one, e.g.
    python -m venv ~/vbench-env && source ~/vbench-env/bin/activate
    pip install torch torchvision --index-url https://download.pytorch.org/whl/cu121
    pip install git+https://github.com/guyuchao/VBench.git   # AnyFlow's fork (or: pip install vbench)
    pip install detectron2@git+https://github.com/facebookresearch/detectron2.git   # object/colour dims
and run this hook there with PYTHONPATH=<anystep>/src (it imports nothing else from anystep)."""


@dataclass(frozen=True)
class VBenchSample:
    """One video of the protocol: ``prompt`` names the file (VBench matches it), ``text`` is what to generate
    from (the extended prompt under the official protocol), ``seed`` its noise seed (the global index)."""

    prompt: str
    text: str
    index: int
    seed: int

    @property
    def filename(self) -> str:
        return video_name(self.prompt, self.index)


def video_name(prompt: str, index: int) -> str:
    """The file VBench looks for: ``{prompt}-{index}.mp4``."""
    if not prompt or "/" in prompt or "\\" in prompt or "\0" in prompt:
        raise UsageError(f"a VBench video is named after its prompt, which must be non-empty and hold no '/', "
                         f"'\\\\' or NUL: {prompt!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise UsageError(f"a VBench video index must be an integer >= 0, got {index!r}")
    return f"{prompt}-{index}.mp4"


def vbench_samples(info_file: str | Path, samples_per_prompt: int = SAMPLES_PER_PROMPT, extended: bool = True,
                   dimensions: Sequence[str] | None = None) -> list[VBenchSample]:
    """The videos to generate for a VBench full-info JSON (a list of ``{"prompt_en", "dimension", ...}``).

    extended: generate from each entry's ``aug_prompt_en`` (the official protocol; the file must have it), else
    from ``prompt_en``. dimensions: keep only the prompts of these dimensions (None: all). The seed of a sample
    is its global index in the order prompt by prompt, index by index, as AnyFlow's VBench dataset numbers them.
    """
    info_file = Path(info_file)
    if not info_file.is_file():
        raise UsageError(f"VBench prompt file {str(info_file)!r} does not exist")
    if samples_per_prompt < 1:
        raise UsageError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    wanted = check_dimensions(dimensions) if dimensions is not None else None
    entries = json.loads(info_file.read_text())
    samples: list[VBenchSample] = []
    for entry in entries:
        if wanted is not None and not set(wanted) & set(entry.get("dimension", [])):
            continue
        key = "aug_prompt_en" if extended else "prompt_en"
        if key not in entry:
            raise UsageError(f"{str(info_file)!r} has an entry without {key!r} ({entry.get('prompt_en')!r}); "
                             "the extended prompts are in AnyFlow's assets/data/meta/vbench/VBench_aug_full_info"
                             ".json, or pass extended=False")
        for index in range(samples_per_prompt):
            samples.append(VBenchSample(entry["prompt_en"], entry[key], index, seed=len(samples)))
    return samples


def write_vbench_videos(videos, samples: Sequence[VBenchSample], out_dir: str | Path, fps: int = FPS) -> list[Path]:
    """Write ``videos`` (B, F, 3, H, W) in [-1, 1], one per sample, as ``out_dir/{prompt}-{index}.mp4``."""
    import imageio.v2 as imageio

    from .media import to_uint8

    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"write_vbench_videos takes RGB videos (B, F, 3, H, W) in [-1, 1], got "
                         f"{tuple(videos.shape)}")
    if len(samples) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos for {len(samples)} samples")
    if videos.shape[-2] % 2 or videos.shape[-1] % 2:
        raise ValueError(f"mp4 (H.264, yuv420p) needs an even height and width, got {tuple(videos.shape[-2:])}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for frames, sample in zip(to_uint8(videos), samples):
        path = out_dir / sample.filename
        imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=1)
        paths.append(path)
    return paths


def check_dimensions(dimensions: Sequence[str], mode: str = "vbench_standard") -> list[str]:
    """The dimensions as a list, or a UsageError naming an unknown one or one the mode cannot score."""
    dims = [dimensions] if isinstance(dimensions, str) else list(dimensions)
    if not dims:
        raise UsageError("give at least one VBench dimension")
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown:
        raise UsageError(f"unknown VBench dimension(s) {unknown}; VBench's are {list(DIMENSIONS)}")
    if mode not in MODES:
        raise UsageError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if mode == "custom_input" and NEEDS_SUITE & set(dims):
        raise UsageError(f"{sorted(NEEDS_SUITE & set(dims))} need VBench's own prompts and their metadata: use "
                         "mode 'vbench_standard' for them")
    return dims


def load_vbench():
    """The installed ``vbench`` package, or a UsageError that says how to install it."""
    try:
        import vbench
    except ImportError as err:
        raise UsageError(INSTALL) from err
    return vbench


def run_vbench(videos_dir: str | Path, out_dir: str | Path, dimensions: Sequence[str] = DIMENSIONS,
               prompts_file: str | Path | None = None, mode: str = "vbench_standard", device: str = "cuda",
               local: bool = False) -> dict[str, float]:
    """Run VBench's ``dimensions`` on the mp4s of ``videos_dir``; returns ``{dimension: score}``.

    Each dimension is evaluated on its own and its result kept as ``out_dir/{dimension}_eval_results.json``
    (VBench's file); a dimension whose file exists is read, not run again, so an interrupted run resumes.
    ``out_dir/scores.json`` gets the scores and, when all 16 are there, Quality, Semantic and Total.

    prompts_file: in the standard mode, the VBench full-info JSON whose prompts name the videos (default: the
    one vbench ships; AnyFlow's ``VBench_aug_full_info.json`` works too). mode: ``vbench_standard`` (files named
    ``{prompt_en}-{index}.mp4`` after that JSON) or ``custom_input`` (any prompts, read from the file names;
    only dimensions that need no prompt metadata). local: load VBench's weights from its cache
    (``$VBENCH_CACHE_DIR`` or ``~/.cache/vbench``) instead of downloading the missing ones.
    """
    dims = check_dimensions(dimensions, mode)
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise UsageError(f"videos folder {str(videos_dir)!r} does not exist")
    if not any(p.suffix.lower() == ".mp4" for p in videos_dir.iterdir()):
        raise UsageError(f"videos folder {str(videos_dir)!r} holds no .mp4 file (write them with "
                         "anystep.evaluate.vbench.write_vbench_videos)")
    if out_dir.resolve() == videos_dir.resolve():
        raise UsageError("give an --out folder apart from the videos folder (VBench reads every file there)")
    vbench = load_vbench()
    if prompts_file is None:
        prompts_file = Path(vbench.__file__).parent / "VBench_full_info.json"
    if mode == "vbench_standard":
        _check_standard_names(videos_dir, Path(prompts_file))
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = None
    scores = {}
    for dim in dims:
        result = out_dir / f"{dim}_eval_results.json"
        if not result.is_file():
            if bench is None:
                bench = vbench.VBench(device, str(prompts_file), str(out_dir))
            bench.evaluate(videos_path=str(videos_dir), name=dim, dimension_list=[dim], local=local, mode=mode)
        if not result.is_file():
            raise RuntimeError(f"VBench ran {dim!r} but wrote no {result}")
        scores[dim] = float(json.loads(result.read_text())[dim][0])   # [score, per-video results]
    summary = dict(scores, **vbench_total(scores)) if set(DIMENSIONS) <= set(scores) else dict(scores)
    (out_dir / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    return scores


def _check_standard_names(videos_dir: Path, prompts_file: Path) -> None:
    """In VBench's standard mode a video counts only when named ``{prompt_en}-{index}.mp4`` after the prompt
    file; when none is, say so instead of letting VBench score nothing."""
    if not prompts_file.is_file():
        raise UsageError(f"VBench prompt file {str(prompts_file)!r} does not exist")
    others = sorted(p.name for p in videos_dir.iterdir() if p.suffix.lower() != ".mp4")
    if others:   # VBench takes the first file's suffix for all the videos it looks for
        raise UsageError(f"{str(videos_dir)!r} holds other files than mp4s ({others[:3]}...); VBench's standard "
                         "mode needs a folder of the videos alone")
    prompts = {entry["prompt_en"] for entry in json.loads(prompts_file.read_text())}
    names = {video_name(p, i) for p in prompts for i in range(SAMPLES_PER_PROMPT)}
    if not any(p.name in names for p in videos_dir.iterdir()):
        raise UsageError(f"no video in {str(videos_dir)!r} is named {{prompt_en}}-{{0..4}}.mp4 after a prompt of "
                         f"{str(prompts_file)!r}; give the prompt file they were made from, or mode custom_input")


def normalized(dimension: str, score: float) -> float:
    """A dimension's score min-max normalised with the leaderboard's range, times its weight."""
    lo, hi = NORMALIZATION.get(dimension, (0.0, 1.0))
    return (score - lo) / (hi - lo) * WEIGHTS.get(dimension, 1.0)


def vbench_total(scores: dict[str, float]) -> dict[str, float]:
    """Quality, Semantic and Total of the 16 dimension scores, as VBench's ``scripts/cal_final_score.py``.

    Quality = the weighted mean of the 7 quality dimensions' normalised scores (dynamic degree weighs 0.5, so
    the sum is divided by 6.5), Semantic = the mean of the 9 semantic ones, Total = 0.8 Quality + 0.2 Semantic.
    Like VBench (unlike AnyFlow's evaluator) no score is clipped to its range first.
    """
    missing = [d for d in DIMENSIONS if d not in scores]
    if missing:
        raise UsageError(f"the VBench total needs all 16 dimensions; missing {missing}")

    def mean(dims):
        return sum(normalized(d, scores[d]) for d in dims) / sum(WEIGHTS.get(d, 1.0) for d in dims)

    quality, semantic = mean(QUALITY_DIMENSIONS), mean(SEMANTIC_DIMENSIONS)
    return {"quality": quality, "semantic": semantic,
            "total": QUALITY_SHARE * quality + (1 - QUALITY_SHARE) * semantic}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m anystep.evaluate.vbench",
        description="Run VBench's dimensions on a folder of sampled videos named {prompt}-{index}.mp4 (VBench "
                    "must be installed: a separate environment on a GPU machine, see README).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The official AnyFlow protocol: 946 VBench prompts, generated from their extended prompts, 5 "
               "samples per prompt, 4 steps, all 16 dimensions.\nDimensions: " + " ".join(DIMENSIONS))
    parser.add_argument("videos_dir", help="folder of mp4s named {prompt}-{index}.mp4")
    parser.add_argument("--out", required=True, help="folder for VBench's results and scores.json")
    parser.add_argument("--dimensions", nargs="+", default=list(DIMENSIONS), metavar="DIM",
                        help="VBench dimensions to run (default: all 16)")
    parser.add_argument("--prompts-file", default=None,
                        help="VBench full-info JSON the videos were made from (default: the one vbench ships)")
    parser.add_argument("--mode", choices=MODES, default="vbench_standard",
                        help="vbench_standard: VBench's prompt suite; custom_input: prompts read from file names")
    parser.add_argument("--device", default="cuda", help="torch device for VBench's models (default cuda)")
    parser.add_argument("--local", action="store_true",
                        help="load VBench's model weights from its cache ($VBENCH_CACHE_DIR or ~/.cache/vbench)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        scores = run_vbench(args.videos_dir, args.out, args.dimensions, args.prompts_file, args.mode,
                            args.device, args.local)
    except UsageError as err:
        print(f"anystep.evaluate.vbench: error: {err}", file=sys.stderr)
        return 2
    for dim, score in scores.items():
        print(f"{dim:24s} {score:.4f}")
    if set(DIMENSIONS) <= set(scores):
        for name, value in vbench_total(scores).items():
            print(f"{name:24s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
