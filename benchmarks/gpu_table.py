"""The README's GPU tables, made from what ``benchmarks/gpu_check.py`` wrote (one JSON, or several when the parts
ran in separate calls: ``--parts chains,throughput,levers`` then ``--parts all-levers,speedup,causal,big``).

    python benchmarks/gpu_table.py gpu_check.json [more.json ...] > gpu_tables.md

Sections: the levers on Stage 1 (each alone, against the baseline: step time, MFU, peak memory, first-step loss,
speed-up), before/after every lever on Stage 1 and Stage 2, where a step's time goes (the profile), the causal
rows (compiled vs eager flex), the 14B rows, the any-step speed-up, and what failed or was skipped. Nothing here measures: every number is a JSON value.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STEP_METRICS = ("step (s)", "MFU (%)", "peak memory (GiB)")


def load(paths: Sequence[Path]) -> dict[str, Any]:
    """The parts of every file, in order (a part measured twice: the later one), and the first file's header."""
    merged: dict[str, Any] = {"parts": {}, "skipped": [], "device": None, "versions": None}
    for path in paths:
        data = json.loads(Path(path).read_text())
        merged["device"] = merged["device"] or data.get("device")
        merged["versions"] = merged["versions"] or data.get("versions")
        for part in data.get("parts", []):
            merged["parts"][part["name"]] = part
        merged["skipped"] += data.get("skipped", [])
    return merged


def value(rows: list[dict[str, Any]], metric: str) -> float | None:
    return next((r["value"] for r in rows if r["metric"] == metric), None)


def size_of(rows: list[dict[str, Any]], stage: str) -> str:
    return next((r["size"] for r in rows if r["metric"] == f"{stage} step (s)"), "n/a")


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def cells(rows: list[dict[str, Any]], stage: str) -> str:
    """``step (s) | MFU (%) | peak (GiB)`` of ``stage``'s rows."""
    return (f"{fmt(value(rows, f'{stage} step (s)'), 4)} | {fmt(value(rows, f'{stage} MFU (%)'))} | "
            f"{fmt(value(rows, f'{stage} peak memory (GiB)'))}")


def _loss(rows: list[dict[str, Any]], stage: str) -> float | None:
    key = "loss/stage1" if stage == "Stage 1" else "loss/dmd"
    return value(rows, f"{stage} first-step {key}")


def lever_table(parts: dict[str, Any]) -> list[str]:
    """Stage 1 with each lever alone against the baseline (same model, size, seed and batch)."""
    base = next((p for n, p in parts.items() if n.startswith("throughput (") and "all levers" not in n
                 and p.get("ok")), None)
    levers = [(n, p) for n, p in parts.items() if n.startswith("lever: ") and p.get("ok")]
    if base is None and not levers:
        return []
    base_rows = base["rows"] if base else []
    base_time = value(base_rows, "Stage 1 step (s)")
    out = [f"### Each lever alone, Stage 1 ({size_of(base_rows or levers[0][1]['rows'], 'Stage 1')})", "",
           "| lever | step (s) | MFU (%) | peak (GiB) | first-step loss | speed-up |", "|---|---:|---:|---:|---:|---:|"]
    entries = [("none (baseline)", base_rows)] + [(", ".join(p["levers"]), p["rows"]) for _, p in levers]
    for label, rows in entries:
        t = value(rows, "Stage 1 step (s)")
        speed = f"{base_time / t:.2f}x" if base_time and t else "n/a"
        out.append(f"| {label} | {fmt(t, 4)} | {fmt(value(rows, 'Stage 1 MFU (%)'))} | "
                   f"{fmt(value(rows, 'Stage 1 peak memory (GiB)'))} | {fmt(_loss(rows, 'Stage 1'), 6)} | {speed} |")
    return out + [""]


def before_after(parts: dict[str, Any]) -> list[str]:
    """Stage 1 and Stage 2 with no lever and with every lever on."""
    base = next((p for n, p in parts.items() if n.startswith("throughput (") and "all levers" not in n
                 and p.get("ok")), None)
    after = next((p for n, p in parts.items() if n.startswith("all levers") and p.get("ok")), None)
    if base is None or after is None:
        return []
    out = [f"### Before and after, every lever on ({', '.join(after['levers'])})", "",
           "| step | levers | size | step (s) | MFU (%) | peak (GiB) | first-step loss | speed-up |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for stage in ("Stage 1", "Stage 2"):
        before = value(base["rows"], f"{stage} step (s)")
        for label, rows in (("none", base["rows"]), ("all", after["rows"])):
            t = value(rows, f"{stage} step (s)")
            speed = f"{before / t:.2f}x" if before and t else "n/a"
            out.append(f"| {stage} | {label} | {size_of(rows, stage)} | {cells(rows, stage)} | "
                       f"{fmt(_loss(rows, stage), 6)} | {speed} |")
    return out + [""]


def profile_tables(parts: dict[str, Any]) -> list[str]:
    """Where one Stage-1 and one Stage-2 step's time goes (baseline), as shares of the profiled time."""
    base = next((p for n, p in parts.items() if n.startswith("throughput (") and p.get("profile")), None)
    if base is None:
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import step_profile

    out = ["### Where the time goes (no lever; torch.profiler, one step each)", ""]
    for name, result in base["profile"].items():
        out += [step_profile.format_table(result, name), ""]
    return out


def big_table(parts: dict[str, Any]) -> list[str]:
    big = next((p for n, p in parts.items() if n.startswith("throughput (") and "all levers" in n and p.get("ok")),
               None)
    if big is None:
        return []
    out = [f"### {big['size']} on one device ({', '.join(big['levers']) or 'no lever'})", "",
           "| step | size | step (s) | MFU (%) | peak (GiB) |", "|---|---|---:|---:|---:|"]
    out += [f"| {stage} | {size_of(big['rows'], stage)} | {cells(big['rows'], stage)} |" for stage in ("Stage 1", "Stage 2")]
    return out + [""]


def causal_table(parts: dict[str, Any]) -> list[str]:
    """The causal (FAR) steps on compiled flex attention, and Stage 1 on eager flex."""
    rows = [(n, p) for n, p in parts.items() if n.startswith("causal (") and p.get("ok")]
    if not rows:
        return []
    out = ["### The causal (FAR) student", "", "| attention | step | size | step (s) | MFU (%) | peak (GiB) |",
           "|---|---|---|---:|---:|---:|"]
    for name, part in rows:
        kernel = name.split(", ", 1)[1].rstrip(")").replace(", Stage 1", "")
        for stage in ("causal Stage 1", "causal Stage 2"):
            if value(part["rows"], f"{stage} step (s)") is None:
                continue
            out.append(f"| {kernel} | {stage} | {size_of(part['rows'], stage)} | {cells(part['rows'], stage)} |")
    return out + [""]


def speedup_table(parts: dict[str, Any]) -> list[str]:
    part = next((p for n, p in parts.items() if n.startswith("any-step speed-up") and p.get("ok")), None)
    if part is None:
        return []
    out = [f"### The any-step speed-up ({part['size']}, random weights)", "",
           ("| pipeline | steps | transformer calls | denoise (s) | end to end (s) | speed-up denoise | "
           "speed-up end to end |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for r in part["rows"]:
        out.append(f"| {r['pipeline']} | {r['steps']} | {r['transformer calls']} | {fmt(r['denoise (s)'], 4)} | "
                   f"{fmt(r['end to end (s)'], 4)} | {r['speed-up, denoise']:.1f}x | "
                   f"{r['speed-up, end to end']:.1f}x |")
    return out + [""]


def problems(data: dict[str, Any]) -> list[str]:
    failed = [f"- {n}: {p.get('error')}" for n, p in data["parts"].items() if not p.get("ok")]
    skipped = [f"- skipped: {s}" for s in data["skipped"]]
    return (["### Not measured", "", *failed, *skipped, ""]) if failed or skipped else []


SECTIONS = (lever_table, before_after, profile_tables, causal_table, big_table, speedup_table)


def render(data: dict[str, Any]) -> str:
    versions = data.get("versions") or {}
    head = [(f"Measured on {data['device']} (torch {versions.get('torch', '?')}, CUDA {versions.get('cuda', '?')}, "
            f"diffusers {versions.get('diffusers', '?')}) by `bash benchmarks/gpu_check.sh`."), ""]
    body = [line for section in SECTIONS for line in section(data["parts"])]
    return "\n".join(head + body + problems(data)).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path, help="gpu_check.py output(s)")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.json if not p.is_file()]
    if missing:
        ap.error(f"not found: {', '.join(missing)}")
    text = render(load(args.json))
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
