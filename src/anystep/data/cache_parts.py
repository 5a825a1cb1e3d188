"""A latent cache written by many processes (``torchrun ... -m anystep cache`` or ``synthesize``).

The source's items fall into *chunks* of ``shard_size`` consecutive items; chunk k goes to process k mod W.
Each process writes its chunks, one shard per chunk, into its own resumable cache under
``out_dir/parts/rank-RRRRR-of-WWWWW/`` (its own ``index.json``), skipping items that any earlier run (of any
number of processes, or one process) already wrote. When all are done, rank 0 writes ``out_dir/index.json``
listing every shard in the source's item order: the same items, in the same order, with the same tensors as
one process writes (the shard files differ in name, and in size where items were skipped).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .latent_cache import INDEX, CacheError, header_mismatch, read_index, write_json_atomic

PARTS = "parts"


def part_dir(out_dir: str | Path, rank: int, world_size: int) -> Path:
    """The folder process ``rank`` of ``world_size`` writes its shards into."""
    return Path(out_dir) / PARTS / f"rank-{rank:05d}-of-{world_size:05d}"


def chunks_of(count: int, shard_size: int, rank: int, world_size: int) -> list[range]:
    """The chunks of ``count`` items (``shard_size`` consecutive items each) that process ``rank`` writes."""
    starts = range(0, count, shard_size)
    return [range(s, min(s + shard_size, count)) for k, s in enumerate(starts) if k % world_size == rank]


def share_of_work(ids: list[str], shard_size: int, rank: int, world_size: int,
                  done: set[str]) -> tuple[list[list[int]], int]:
    """The positions of the items process ``rank`` writes that are not ``done``, in groups that each end a
    shard (its chunks; one group for one process), and how many items are its share in all."""
    chunks = chunks_of(len(ids), shard_size, rank, world_size) if world_size > 1 else [range(len(ids))]
    return [[i for i in chunk if ids[i] not in done] for chunk in chunks], sum(map(len, chunks))


def writer_dir(out_dir: str | Path, rank: int, world_size: int) -> Path:
    """Where process ``rank`` writes: the cache itself for one process, else its part."""
    return part_dir(out_dir, rank, world_size) if world_size > 1 else Path(out_dir)


def indexes(out_dir: Path) -> list[tuple[Path, dict]]:
    """Every index of the cache: the top-level one (when present) and each part's."""
    found = [(out_dir, read_index(out_dir))] if (out_dir / INDEX).is_file() else []
    parts = sorted(p for p in (out_dir / PARTS).glob("rank-*") if (p / INDEX).is_file()) \
        if (out_dir / PARTS).is_dir() else []
    return found + [(p, read_index(p)) for p in parts]


def done_everywhere(out_dir: str | Path) -> set[str]:
    """The ids written to a shard by any run into ``out_dir`` (the merged index and every part)."""
    return {i for _, index in indexes(Path(out_dir)) for shard in index["shards"] for i in shard["ids"]}


def merge_parts(out_dir: str | Path, order: list[str]) -> Path:
    """Write ``out_dir/index.json`` listing every shard of the cache and its parts, ordered by the position of
    their first item in ``order`` (the source's ids); a part written with other settings is a CacheError."""
    out_dir = Path(out_dir)
    found = indexes(out_dir)
    if not found:
        raise CacheError(f"{out_dir} holds no cache to merge")
    base = found[0][1]
    position = {item: i for i, item in enumerate(order)}
    shards, skipped, seen = [], {}, set()
    for folder, index in found:
        problem = header_mismatch(base, index)
        if problem:
            raise CacheError(f"{folder / INDEX} was written with other settings: {problem}")
        for shard in index["shards"]:
            file = str((folder / shard["file"]).relative_to(out_dir))
            if file not in seen:
                seen.add(file)
                shards.append({**shard, "file": file})
        skipped.update(index.get("skipped", {}))
    shards.sort(key=lambda s: min((position.get(i, len(order)) for i in s["ids"]), default=len(order)))
    done = {i for s in shards for i in s["ids"]}
    merged = {**base, "shards": shards, "skipped": {k: v for k, v in skipped.items() if k not in done}}
    write_json_atomic(out_dir / INDEX, merged)
    return out_dir


def join_parts(out_dir: str | Path, order: list[str], rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] | None = None) -> None:
    """Once every process is done, rank 0 writes the index of all parts (:func:`merge_parts`); the others wait
    for it. One process re-orders a cache that has parts (items it added after a many-process run)."""
    if world_size == 1:
        if (Path(out_dir) / PARTS).is_dir():
            merge_parts(out_dir, order)
        return
    if barrier is None:
        raise ValueError("many processes need a barrier to join their parts")
    barrier()
    if rank == 0:
        merge_parts(out_dir, order)
    barrier()
