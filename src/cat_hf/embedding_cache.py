"""Reading the embedding caches that `cat-hf embed --encoder` writes for Representation Regularization.

A cache is a folder of shards:

- `shard-00000.safetensors`: `embeddings` (n, D) float32 and `indices` (n,) int64, the example indices of
  the corpus; shard k covers examples [k * shard_size, (k + 1) * shard_size). Clips that cannot be read are
  skipped and have no row; their indices and reasons sit in the shard's metadata (`failed`).
- `index.json`: encoder name / spec, embedding dim, sampling rate, corpus fingerprint, number of examples,
  shard list, failures, and whether the cache is complete.

`EmbeddingCache` reads a cache back (`cache[i]`, `cache.get_batch(indices)`) and refuses one computed for another
corpus; `corpus_fingerprint` is the corpus identity both sides use. This module needs neither the writer
(`cat_hf.embed`) nor the encoders (`cat_hf.external_encoders`), which both import it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

INDEX_FILE = "index.json"
CACHE_FORMAT = "cat-hf-embedding-cache"
CACHE_VERSION = 1
SHARD_PATTERN = "shard-{:05d}.safetensors"
EMBEDDINGS_KEY = "embeddings"
INDICES_KEY = "indices"


class EmbeddingCacheError(ValueError):
    """An embedding cache is missing, damaged, incomplete, or belongs to another corpus / encoder."""


# ---------------------------------------------------------------------------------------------------------
# corpus identity
# ---------------------------------------------------------------------------------------------------------


def corpus_fingerprint(dataset: Any, audio_column: str = "audio") -> str:
    """A stable identity of a corpus: its size and, in order, each clip's path (relative to the clips'
    common folder, so a moved corpus keeps its fingerprint) or, for in-memory clips, a hash of the bytes.

    Two loads of the same files in the same order agree; reordering, adding or removing clips changes it.
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(
            "Embedding caches are indexed by example, so the corpus must be a map-style datasets.Dataset; load "
            "it without streaming=True."
        )
    if audio_column not in dataset.column_names:
        raise ValueError(f"The corpus has no {audio_column!r} column (columns: {dataset.column_names}).")
    feature = dataset.features[audio_column]
    table = dataset.select_columns([audio_column])
    if isinstance(feature, datasets.Audio) and feature.decode:
        table = table.cast_column(audio_column, datasets.Audio(decode=False))
    ids: list[str] = []
    paths: list[str] = []
    for batch in table.with_format(None).iter(batch_size=4096):
        for entry in batch[audio_column]:
            ident, path = _entry_identity(entry)
            ids.append(ident)
            if path is not None:
                paths.append(path)
    root = _common_folder(paths)
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{len(ids)}\n".encode())
    for ident in ids:
        if ident.startswith("path:") and root:
            ident = "path:" + os.path.relpath(ident[5:], root)
        digest.update(ident.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _entry_identity(entry: Any) -> tuple[str, str | None]:
    if isinstance(entry, str):
        return f"path:{entry}", entry
    if isinstance(entry, Mapping):
        if entry.get("path"):
            return f"path:{entry['path']}", str(entry["path"])
        if entry.get("bytes") is not None:
            return "bytes:" + hashlib.sha1(bytes(entry["bytes"])).hexdigest(), None
        if entry.get("array") is not None:
            array = np.ascontiguousarray(np.asarray(entry["array"], dtype=np.float32))
            return f"array:{entry.get('sampling_rate')}:" + hashlib.sha1(array.tobytes()).hexdigest(), None
    return f"repr:{entry!r}", None


def _common_folder(paths: list[str]) -> str:
    if not paths:
        return ""
    try:
        root = os.path.commonpath(paths)
    except ValueError:  # a mix of absolute and relative paths (or drives)
        return ""
    if len(paths) == 1 or root in paths:
        root = os.path.dirname(root)
    return root


# ---------------------------------------------------------------------------------------------------------
# reading a cache
# ---------------------------------------------------------------------------------------------------------


def read_cache_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX_FILE
    if not path.is_file():
        raise EmbeddingCacheError(
            f"'{folder}' is not an embedding cache (no {INDEX_FILE}); create it with "
            "`cat-hf embed CORPUS --encoder SPEC --output-dir FOLDER`."
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EmbeddingCacheError(f"'{path}' is not valid JSON ({err}); delete the cache folder and embed again.") from err
    if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
        raise EmbeddingCacheError(
            f"'{path}' is not a version-{CACHE_VERSION} cat-hf embedding cache (format={index.get('format')!r}, "
            f"version={index.get('version')!r}); recreate it with this version of `cat-hf embed`."
        )
    return index


class EmbeddingCache:
    """Read access to a folder written by `cat-hf embed`.

    Indexing is by example index of the corpus: `cache[i]` -> (D,) float32 tensor, `cache.get_batch(indices)`
    -> (B, D). `len(cache)` is the number of examples of the corpus; clips that could not be read have no
    embedding (`missing_indices`, `i in cache`). Shards are loaded on first use and kept in memory.

    Args:
        folder: the cache folder.
        corpus: the dataset the cache will be used with; its fingerprint must match the one recorded.
        fingerprint: the expected corpus fingerprint (alternative to `corpus`).
        allow_incomplete: read a cache whose `cat-hf embed` run has not finished (missing shards count as
            missing rows); by default such a cache is refused.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        corpus: Any = None,
        fingerprint: str | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.index = read_cache_index(self.folder)
        if corpus is not None:
            fingerprint = corpus_fingerprint(corpus)
        recorded = self.index["corpus"]["fingerprint"]
        if fingerprint is not None and fingerprint != recorded:
            num = len(corpus) if corpus is not None else "?"
            raise EmbeddingCacheError(
                f"The embedding cache '{self.folder}' was computed for another corpus (fingerprint "
                f"{recorded[:12]}..., {self.index['corpus']['num_examples']} examples) than this one "
                f"({fingerprint[:12]}..., {num} examples): the clips, their order or their number differ. Embed "
                f"this corpus with `cat-hf embed CORPUS --encoder {self.index['encoder'].get('spec') or 'SPEC'} "
                "--output-dir NEW_FOLDER` and point the config at the new folder."
            )
        if not self.index.get("complete") and not allow_incomplete:
            raise EmbeddingCacheError(
                f"The embedding cache '{self.folder}' is incomplete ({len(self.index['shards'])} of "
                f"{self.index['num_shards']} shards); finish it by running the same `cat-hf embed` command again "
                "(it resumes), or pass allow_incomplete=True."
            )
        self.dim = int(self.index["embedding_dim"])
        self.sampling_rate = int(self.index["sampling_rate"])
        self.encoder_name = str(self.index["encoder"]["name"])
        self.fingerprint = recorded
        self.num_examples = int(self.index["corpus"]["num_examples"])
        self.shard_size = int(self.index["shard_size"])
        self._shard_files: dict[int, str] = {int(s["shard"]): s["file"] for s in self.index["shards"]}
        self._loaded: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        done_failed = {int(i) for s in self.index["shards"] for i in s["failed"]}
        missing_shards = [k for k in range(self.index["num_shards"]) if k not in self._shard_files]
        for k in missing_shards:
            done_failed.update(range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_examples)))
        self.missing_indices: list[int] = sorted(done_failed)
        self.num_embeddings = self.num_examples - len(self.missing_indices)

    def __len__(self) -> int:
        return self.num_examples

    def __contains__(self, index: int) -> bool:
        _shard, position = self._position(int(index), strict=False)
        return position is not None

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.get_batch([index])[0]

    def get_batch(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, D) float32 embeddings of the given example indices, in that order."""
        if isinstance(indices, (torch.Tensor, np.ndarray)):
            indices = indices.reshape(-1).tolist()
        rows = []
        for index in indices:
            shard, position = self._position(int(index), strict=True)
            rows.append(self._loaded[shard][0][position])
        if not rows:
            return torch.empty(0, self.dim)
        return torch.stack(rows)

    def available_indices(self) -> list[int]:
        """Example indices that have an embedding (use them to filter the training set)."""
        missing = set(self.missing_indices)
        return [i for i in range(self.num_examples) if i not in missing]

    def _position(self, index: int, *, strict: bool) -> tuple[int, int | None]:
        if not 0 <= index < self.num_examples:
            if not strict:
                return -1, None
            raise IndexError(
                f"Example index {index} is outside the embedding cache '{self.folder}' ({self.num_examples} examples)."
            )
        shard = index // self.shard_size
        if shard not in self._shard_files:
            if not strict:
                return shard, None
            raise KeyError(
                f"Example {index} is in shard {shard}, which the unfinished `cat-hf embed` run has not written yet; "
                "finish the cache by running the same command again."
            )
        self._load_shard(shard)
        position = int(self._loaded[shard][1][index - shard * self.shard_size])
        if position < 0:
            if not strict:
                return shard, None
            raise KeyError(
                f"Example {index} has no embedding in '{self.folder}': its audio could not be read when the cache "
                "was built (see `failed` in index.json); drop it from the training set, e.g. "
                "dataset.select(cache.available_indices())."
            )
        return shard, position

    def _load_shard(self, shard: int) -> None:
        if shard in self._loaded:
            return
        path = self.folder / self._shard_files[shard]
        try:
            tensors = load_file(str(path))
        except Exception as err:
            raise EmbeddingCacheError(
                f"Cannot read shard '{path}' ({err}); delete it and run `cat-hf embed` again to recompute it."
            ) from err
        embeddings, indices = tensors[EMBEDDINGS_KEY].to(torch.float32), tensors[INDICES_KEY].numpy()
        start = shard * self.shard_size
        stop = min(start + self.shard_size, self.num_examples)
        positions = np.full(stop - start, -1, dtype=np.int64)
        positions[indices - start] = np.arange(len(indices))
        self._loaded[shard] = (embeddings, positions)

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache(folder='{self.folder}', encoder={self.encoder_name!r}, dim={self.dim}, "
            f"examples={self.num_examples}, missing={len(self.missing_indices)})"
        )


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "INDEX_FILE",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "corpus_fingerprint",
    "read_cache_index",
]
