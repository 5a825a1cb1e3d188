"""The README stays true: its Python example runs as written, every function its equation table points to
exists where it says, and every dotted override it (or a preset's header) shows is a key some kind accepts."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from anystep.config import ConfigError, load_preset, preset_names, resolve
from anystep.kinds import all_kinds

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PRESETS = set(preset_names())


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


@pytest.mark.slow     # two short gmm trainings and a sweep: about 45 s on 2 cores
def test_python_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", _section("From Python"), re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (From Python)", "exec"), namespace)  # noqa: S102
    assert "N" in namespace["result"].table and (tmp_path / "runs/py_stage1/sweep/sweep.csv").exists()
    assert namespace["role"] == "student" and not namespace["student"].training


def _equation_rows() -> list[tuple[str, str]]:
    """(module, name) pairs from the 'Where each equation lives' table: `path.py`: `name`, `name`."""
    pairs = []
    for line in _section("Where each equation lives").splitlines()[4:]:
        code = line.rsplit("|", 2)[-2] if line.startswith("|") else ""
        for part in code.split(";"):
            m = re.match(r"\s*`(?:anystep/)?([\w/]+)\.py`(?::\s*(.*))?", part)
            if not m:
                continue
            module = "anystep." + m.group(1).replace("/", ".")
            names = re.findall(r"`(\w+(?:\.\w+)*)`", m.group(2) or "")
            pairs += [(module, n) for n in names] or [(module, "")]
    return pairs


def _has(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_equation_table_points_at_real_functions():
    pairs = _equation_rows()
    assert len(pairs) > 30
    missing = []
    for module, name in pairs:
        mod = importlib.import_module(module)
        if name and not _has(mod, name):
            missing.append(f"{module}.{name}")
    assert not missing, f"README names functions that do not exist: {missing}"


def _overrides(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])((?:world|model|train|optim|ema|sweep|stage1|stage2|consistency|cbs|teacher|causal)"
                          r"\.[\w.]+=(?:\[[^\]]*\]|[^\s`),:;\"\[]+))", text))


def _accepted(item: str, line: Sequence[str] = ()) -> bool:
    """Whether some preset (or some kind's defaults) takes ``item`` as an override (a wrong key is an error), alone or
    with the other overrides of its ``line`` (values that only hold together, e.g. a world's frames and speed)."""
    starts = [(name, []) for name in sorted(PRESETS)] + [(None, [f"kind={k}"]) for k in all_kinds()]
    for preset, kind in starts:
        for items in filter(None, ([item], list(line))):
            try:
                resolve(preset, [*kind, *items])
                return True
            except (ConfigError, ValueError):
                continue
    return False


def _checked(text: str) -> set[str]:
    """The overrides of ``text`` that the test resolves (world.wan.* and model.init= name local folders)."""
    return {i for i in _overrides(text) if not i.startswith(("world.wan.", "model.init="))}


def _line_of(item: str, text: str) -> list[str]:
    """The checked overrides shown on the first line of ``text`` that shows ``item``."""
    return sorted(_checked(next(ln for ln in text.splitlines() if item in ln)))


@pytest.mark.parametrize("source", ["README.md", "presets"])
def test_every_override_shown_is_accepted(source):
    if source == "README.md":
        text = README
    else:
        text = "\n".join((ROOT / "src/anystep/configs" / f"{n}.yaml").read_text() for n in preset_names())
    items = _checked(text)
    assert len(items) > 5
    rejected = sorted(i for i in items if not _accepted(i, _line_of(i, text)))
    assert not rejected, f"{source} shows overrides no kind accepts: {rejected}"


def test_every_preset_parses():
    for name in preset_names():
        data = load_preset(name)
        if data.get("world", {}).get("name") == "wan":
            continue          # needs a local model folder (tests/test_wan_chain.py runs those presets)
        resolve(name)


def test_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The 'Python API' block, on a tiny Stage-1 -> Stage-2 chain from the shipped teacher where the demo writes
    its runs (a few seconds)."""
    from anystep.recipes import train

    monkeypatch.chdir(tmp_path)
    tiny = ["train.batch_size=2", "train.steps=1", "optim.student.warmup_steps=1"]
    train(resolve("shapes_stage1", [*tiny, "train.out_dir=runs/demo/stage1"]), progress=False)
    train(resolve("shapes_stage2", [*tiny, "train.out_dir=runs/demo/stage2", "model.init=runs/demo/stage1",
                                    "stage2.dmd_batch_size=2"]), progress=False)
    block = re.search(r"```python\n(.*?)```", _section("Python API"), re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md (Python API)", "exec"), namespace)  # noqa: S102
    one, back, eight = namespace["one"], namespace["back"], namespace["eight"]
    assert one.x.shape[0] == 4 and namespace["red"].labels == ["a red disk moving left"] * 2
    assert torch.allclose(one.noise - namespace["u"], one.x, atol=1e-5)
    assert torch.equal(back.x, eight.x) and back.labels == eight.labels and back.settings["steps"] == "8"
