"""The latent cache format (``anystep-latents/1``): VAE latents and UMT5 embeddings in safetensors shards.

A cache directory holds three kinds of file:

``index.json``
    ``{"format": "anystep-latents/1", "model": <source model folder>, "source": "videos" | "teacher",
    "frames", "height", "width", "latent_shape": [C, F, H, W], "text_dim", "max_text_len", "dtype",
    "settings": {...}, "shards": [{"file": "shard-00000.safetensors", "count": n, "ids": [...],
    "max_length": L}, ...], "skipped": {id: reason}}``. ``settings`` holds what else decides the items
    (the video stride, or the teacher's steps/guidance/seed) and the negative prompt. ``skipped`` lists
    source videos that could not be used; ``cache_videos`` also records the video source path
    (``"videos"``) for information. Rewritten atomically after every shard.
``null.safetensors``
    ``{"embedding": (L, D)}``: the trimmed embedding of the null (negative) prompt, its text in the
    metadata field ``"text"``. Used for text dropout and as the unconditional branch of guidance.
``shard-XXXXX.safetensors``
    ``"latents"`` ``(n, C, F, H, W)``: VAE posterior-**mean** latents normalised per channel with the VAE
    config's ``latents_mean``/``latents_std`` as ``(z - mean) / std``, the space WanPipeline's denoiser
    works in (it decodes with ``z * std + mean``); ``"prompt_embeds"`` ``(n, L, D)``, ``L`` the longest
    prompt of the shard, zero beyond each prompt's length; ``"prompt_lengths"`` ``(n,)`` int64. Metadata:
    ``"ids"`` and ``"captions"`` as JSON lists. Written to a temporary file, then renamed.

Tensors are stored in the cache's ``dtype``; ``LatentCache`` returns float32 and pads embeddings to
``max_text_len`` (Wan's 512 unless overridden). A cache is resumable: ``ShardWriter`` reopens it when the
header matches (same model, source, frames, height, width, max_text_len, dtype, settings) and reports which
ids are done; a partial last shard stays as it is and new items go to new shards.
"""

from __future__ import annotations

import json
import os
import warnings
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import UsageError

FORMAT = "anystep-latents/1"
INDEX = "index.json"
NULL = "null.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATCH_FIELDS = ("format", "model", "source", "frames", "height", "width", "max_text_len", "dtype", "settings")
REQUIRED_FIELDS = ("model", "source", "frames", "height", "width", "latent_shape", "text_dim", "max_text_len",
                   "dtype")


class CacheError(UsageError, RuntimeError):
    """A cache directory or file that cannot be read or does not fit the run."""


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (float32, bfloat16, float16)."""
    if name not in DTYPES:
        raise UsageError(f"dtype {name!r} not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors`` save through a temporary file and a rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_index(directory: str | Path) -> dict:
    """``index.json`` of a cache, checked for its format and fields, or an error naming the file."""
    path = Path(directory) / INDEX
    if not path.is_file():
        raise CacheError(f"{path} not found: {Path(directory)} is not a latent cache (make one with "
                         f"`anystep cache` or `anystep synthesize`)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is corrupt: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CacheError(f"{path}: format {index.get('format') if isinstance(index, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    missing = [k for k in (*REQUIRED_FIELDS, "shards") if k not in index]
    if missing:
        raise CacheError(f"{path} lacks the fields {missing}")
    return index


def write_null_embedding(directory: str | Path, embedding: torch.Tensor, text: str, dtype: str) -> Path:
    """Write ``null.safetensors``: the trimmed ``(L, D)`` null-prompt embedding and its text."""
    path = Path(directory) / NULL
    save_atomic({"embedding": embedding.to(torch_dtype(dtype))}, path, {"text": text})
    return path


def header_mismatch(old: dict, new: dict) -> str | None:
    """The first matched field (or ``settings`` key) that differs between two headers, described."""
    for field in MATCH_FIELDS:
        a, b = old.get(field), new.get(field)
        if field == "settings" and isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"settings.{key} is {a.get(key)!r} in the cache but {b.get(key)!r} now"
        elif a != b:
            return f"{field} is {a!r} in the cache but {b!r} now"
    return None


# ----------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Buffers cache items and writes them ``shard_size`` at a time; resumes a cache with the same header.

    ``header`` needs ``model, source, frames, height, width, latent_shape, text_dim, max_text_len, dtype``
    (and may add ``settings`` and informational fields)."""

    def __init__(self, out_dir: str | Path, shard_size: int, header: dict):
        if shard_size < 1:
            raise UsageError(f"shard_size must be >= 1, got {shard_size}")
        missing = [k for k in REQUIRED_FIELDS if k not in header]
        if missing:
            raise ValueError(f"cache header lacks {missing}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.dtype = torch_dtype(header["dtype"])
        self.index = {"format": FORMAT, **header, "shards": [], "skipped": {}}
        if (self.dir / INDEX).exists():
            self._resume(read_index(self.dir))
        self._done = {i for shard in self.index["shards"] for i in shard["ids"]}
        self._buffer: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []

    def _resume(self, old: dict) -> None:
        """Continue an existing cache whose header matches, or raise naming the differing field."""
        problem = header_mismatch(old, self.index)
        if problem:
            raise CacheError(f"{self.dir / INDEX} was written with other settings: {problem}. Use another "
                             f"output folder, or the cache's settings to resume it.")
        for shard in old["shards"]:
            if not (self.dir / shard["file"]).is_file():
                raise CacheError(f"{self.dir / shard['file']} is listed in {INDEX} but missing")
        self.index["shards"] = old["shards"]
        self.index["skipped"] = old.get("skipped", {})

    def done_ids(self) -> set[str]:
        """Ids already written to shards (buffered ids are not done until their shard is written)."""
        return set(self._done)

    def add(self, item_id: str, latents: torch.Tensor, prompt_embeds: torch.Tensor, caption: str) -> None:
        """Buffer one item: ``latents`` ``(C, F, H, W)`` normalised, ``prompt_embeds`` trimmed ``(L, D)``."""
        if item_id in self._done or any(item_id == b[0] for b in self._buffer):
            raise ValueError(f"item {item_id!r} is already in the cache {self.dir}")
        if list(latents.shape) != list(self.index["latent_shape"]):
            raise ValueError(f"{item_id}: latents {tuple(latents.shape)}, cache expects "
                             f"{tuple(self.index['latent_shape'])}")
        if prompt_embeds.ndim != 2 or prompt_embeds.shape[1] != self.index["text_dim"]:
            raise ValueError(f"{item_id}: prompt_embeds {tuple(prompt_embeds.shape)}, expected (L, "
                             f"{self.index['text_dim']})")
        self._buffer.append((item_id, latents.detach().to("cpu", self.dtype),
                             prompt_embeds.detach().to("cpu", self.dtype), caption))
        self.index["skipped"].pop(item_id, None)
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def skip(self, item_id: str, reason: str) -> None:
        """Record a source item that could not be used (written to ``index.json`` with the next shard)."""
        self.index["skipped"][item_id] = reason

    def flush(self) -> None:
        """Write the buffered items as one shard (if any), then the index."""
        if self._buffer:
            self._write_shard(self._buffer)
            self._buffer = []
        write_json_atomic(self.dir / INDEX, self.index)

    def _write_shard(self, items: list) -> None:
        ids, latents, embeds, captions = zip(*items)
        lengths = torch.tensor([e.shape[0] for e in embeds], dtype=torch.int64)
        padded = torch.zeros(len(items), int(lengths.max()), embeds[0].shape[1], dtype=self.dtype)
        for i, e in enumerate(embeds):
            padded[i, :e.shape[0]] = e
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        save_atomic({"latents": torch.stack(latents), "prompt_embeds": padded, "prompt_lengths": lengths},
                    self.dir / name, {"ids": json.dumps(list(ids), ensure_ascii=False),
                                      "captions": json.dumps(list(captions), ensure_ascii=False)})
        self.index["shards"].append({"file": name, "count": len(items), "ids": list(ids),
                                     "max_length": int(lengths.max())})
        self._done.update(ids)

    def close(self) -> None:
        """Write the final (possibly partial) shard and the index."""
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- reading
class LatentCache:
    """Reads a latent cache lazily: shards are opened (memory-mapped) on first use, at most ``max_open``
    at a time, and only the requested rows are read."""

    def __init__(self, directory: str | Path, max_text_len: int | None = None, max_open: int = 8):
        self.dir = Path(directory)
        self.index = read_index(self.dir)
        self.max_text_len = int(max_text_len or self.index.get("max_text_len", 512))
        self.shards = self.index["shards"]
        for shard in self.shards:
            if not (self.dir / shard["file"]).is_file():
                raise CacheError(f"{self.dir / shard['file']} is listed in {self.dir / INDEX} but missing")
        counts = [int(s["count"]) for s in self.shards]
        self._starts = [sum(counts[:i]) for i in range(len(counts))]
        self._len = sum(counts)
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self.max_open = max_open
        self._captions: list[str] | None = None
        longest = max((int(s.get("max_length", 0)) for s in self.shards), default=0)
        if longest > self.max_text_len:
            warnings.warn(f"{self.dir}: prompts of up to {longest} tokens are cut to max_text_len="
                          f"{self.max_text_len}", stacklevel=2)

    def __len__(self) -> int:
        return self._len

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, F, H, W)`` of one item."""
        return tuple(self.index["latent_shape"])

    @property
    def text_dim(self) -> int:
        return int(self.index["text_dim"])

    @property
    def ids(self) -> list[str]:
        return [i for shard in self.shards for i in shard["ids"]]

    @property
    def captions(self) -> list[str]:
        """All captions in cache order (read from the shards' metadata once)."""
        if self._captions is None:
            self._captions = [c for k in range(len(self.shards)) for c in self._shard(k)[2]]
        return self._captions

    def _shard(self, k: int) -> tuple:
        """``(safe_open handle, prompt_lengths, captions)`` of shard ``k``, opened on demand (LRU)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        entry = self._load_shard(k)
        self._open[k] = entry
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return entry

    def _load_shard(self, k: int) -> tuple:
        from safetensors import SafetensorError, safe_open

        path = self.dir / self.shards[k]["file"]
        try:
            handle = safe_open(str(path), framework="pt")
            lengths = handle.get_tensor("prompt_lengths")
            captions = json.loads(handle.metadata()["captions"])
            shape = handle.get_slice("latents").get_shape()
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise CacheError(f"cannot read shard {path} (corrupt or truncated?): {err}") from err
        count = int(self.shards[k]["count"])
        if shape[0] != count or len(lengths) != count or list(shape[1:]) != list(self.latent_shape):
            raise CacheError(f"shard {path} holds latents {shape}, but {INDEX} says {count} x "
                             f"{list(self.latent_shape)}")
        return handle, lengths, captions

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, row in shard)`` of a cache index."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for a cache of {self._len} items")
        k = bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One item: float32 latents ``(C, F, H, W)`` and the trimmed embedding ``(L, D)``."""
        k, row = self.locate(int(index))
        handle, _, _ = self._shard(k)
        return handle.get_slice("latents")[row:row + 1][0].float(), self.embedding(index)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``(n, C, F, H, W)`` and prompt embeddings ``(n, max_text_len, D)`` (zero-padded), float32."""
        from .text import pad_embeddings

        items = [self.item(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        if not items:
            return torch.zeros(0, *self.latent_shape), torch.zeros(0, self.max_text_len, self.text_dim)
        return torch.stack([x for x, _ in items]), pad_embeddings([e for _, e in items], self.max_text_len)

    def sample(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` of ``n`` indices drawn uniformly (with replacement) from ``generator``; only ``rows`` of
        them are read (a process's share of a global batch)."""
        return self.batch(self._draw(n, generator)[rows])

    def sample_embeddings(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> torch.Tensor:
        """The prompt embeddings of :meth:`sample` (the same draws), without reading the latents."""
        from .text import pad_embeddings

        embeds = [self.embedding(i) for i in self._draw(n, generator)[rows].tolist()]
        if not embeds:
            return torch.zeros(0, self.max_text_len, self.text_dim)
        return pad_embeddings(embeds, self.max_text_len)

    def embedding(self, index: int) -> torch.Tensor:
        """One item's trimmed prompt embedding ``(L, D)``, float32."""
        k, row = self.locate(int(index))
        handle, lengths, _ = self._shard(k)
        return handle.get_slice("prompt_embeds")[row:row + 1][0, :int(lengths[row])].float()

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self._len, (n,), generator=generator, device="cpu")

    def null_embedding(self) -> torch.Tensor:
        """The null (negative) prompt embedding, float32 ``(1, max_text_len, D)``, zero beyond its length."""
        from safetensors import SafetensorError, safe_open

        from .text import pad_embeddings

        path = self.dir / NULL
        if not path.is_file():
            raise CacheError(f"{path} not found (the cache has no null-prompt embedding)")
        try:
            with safe_open(str(path), framework="pt") as f:
                embedding = f.get_tensor("embedding")
        except (SafetensorError, OSError) as err:
            raise CacheError(f"cannot read {path} (corrupt or truncated?): {err}") from err
        return pad_embeddings([embedding.float()], self.max_text_len)
