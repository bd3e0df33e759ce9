"""`cat-hf embed`: run a frozen external encoder once over a corpus and cache one embedding per clip.

Representation Regularization needs the teacher's embedding of every pretraining clip; computing it once
(as the authors did) keeps the teacher out of the training loop. The cache is a folder of shards:

- `shard-00000.safetensors`: `embeddings` (n, D) float32 and `indices` (n,) int64, the example indices of
  the corpus; shard k covers examples [k * shard_size, (k + 1) * shard_size). Clips that cannot be read are
  skipped and have no row; their indices and reasons sit in the shard's metadata (`failed`).
- `index.json`: encoder name / spec, embedding dim, sampling rate, corpus fingerprint, number of examples,
  shard list, failures, and whether the cache is complete.

Every file is written to a temporary name and renamed. A run that stops part way is resumed by running the
same command again: complete shards are kept, the rest are computed. `EmbeddingCache` reads a cache back
(`cache[i]`, `cache.get_batch(indices)`) and refuses one computed for another corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .external_encoders import (
    INPUT_SAMPLING_RATE,
    ExternalEncoder,
    build_external_encoder,
)
from .files import atomic_write_json

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
CACHE_FORMAT = "cat-hf-embedding-cache"
CACHE_VERSION = 1
SHARD_PATTERN = "shard-{:05d}.safetensors"
EMBEDDINGS_KEY = "embeddings"
INDICES_KEY = "indices"
DEFAULT_SHARD_SIZE = 1024
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_SECONDS = 10.0
_TMP_MARKER = ".tmp-"


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
# atomic files
# ---------------------------------------------------------------------------------------------------------


def _temporary_path(path: Path) -> Path:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARKER}")
    os.close(handle)
    # mkstemp creates 0600 files; a cache is shared data, so give it the usual umask-based permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return Path(name)


def _atomic_save_shard(path: Path, embeddings: torch.Tensor, indices: torch.Tensor, metadata: dict[str, str]) -> None:
    temporary = _temporary_path(path)
    try:
        save_file({EMBEDDINGS_KEY: embeddings.contiguous(), INDICES_KEY: indices.contiguous()}, str(temporary), metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary files left by a run that was killed mid-write are garbage; only ours are touched."""
    for path in folder.glob(f".*{_TMP_MARKER}*"):
        if path.name.startswith((f".{INDEX_FILE}", ".shard-")):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# reading a cache
# ---------------------------------------------------------------------------------------------------------


def _read_index(folder: Path) -> dict[str, Any]:
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
        self.index = _read_index(self.folder)
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


# ---------------------------------------------------------------------------------------------------------
# writing a cache
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EmbedReport:
    """What one `embed_corpus` run did."""

    output_dir: str
    num_examples: int
    num_embeddings: int
    num_shards: int
    shards_computed: int
    shards_reused: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            (f"embedded {self.num_embeddings}/{self.num_examples} clips into '{self.output_dir}' "
            f"({self.num_shards} shards: {self.shards_computed} computed, {self.shards_reused} already done) "
            f"in {self.seconds:.1f} s"),
        ]
        if self.failed:
            lines.append(f"{len(self.failed)} clip(s) could not be read and have no embedding:")
            lines += [f"  #{f['index']} {f['source']}: {f['reason']}" for f in self.failed[:20]]
            if len(self.failed) > 20:
                lines.append(f"  ... and {len(self.failed) - 20} more (see {INDEX_FILE})")
        return "\n".join(lines)


class _ClipReader(torch.utils.data.Dataset):
    """Decodes clips of the corpus at 16 kHz by example index; failures become (index, None, source, reason)."""

    def __init__(self, dataset: Any, max_samples: int | None) -> None:
        self.dataset = dataset
        self.max_samples = max_samples

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str, str]:
        from .audio import describe_audio_source, load_audio

        entry = None
        try:
            entry = self.dataset[index]["audio"]
            waveform = load_audio(entry, target_sr=INPUT_SAMPLING_RATE)
        except Exception as err:  # noqa: BLE001 - an unreadable clip is skipped and reported, never fatal
            reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            source = describe_audio_source(entry).strip("'") if entry is not None else f"#{index}"
            return index, None, source, str(reason)
        if self.max_samples is not None:
            waveform = waveform[: self.max_samples]
        return index, waveform, "", ""


def _collate(items: list[Any]) -> list[Any]:
    return items


def _shard_range(shard: int, shard_size: int, num_examples: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_examples))


def _read_existing_shard(path: Path, shard: int, shard_size: int, num_examples: int, dim: int) -> dict[str, Any] | None:
    """The shard's index entry if `path` is a complete, consistent shard, else None (it gets recomputed)."""
    expected = _shard_range(shard, shard_size, num_examples)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            embeddings = handle.get_tensor(EMBEDDINGS_KEY)
            indices = handle.get_tensor(INDICES_KEY)
        failed = json.loads(metadata.get("failed", "[]"))
    except Exception as err:  # noqa: BLE001 - a damaged shard is simply recomputed
        logger.warning("Recomputing damaged shard '%s' (%s).", path, err)
        return None
    ok = (
        embeddings.ndim == 2 and embeddings.shape[1] == dim and indices.ndim == 1
        and len(indices) == embeddings.shape[0]
        and sorted(indices.tolist() + [int(f["index"]) for f in failed]) == list(expected)
    )
    if not ok:
        logger.warning("Recomputing shard '%s': its contents do not match this run.", path)
        return None
    return {
        "shard": shard, "file": path.name, "start": expected.start, "stop": expected.stop,
        "num_embeddings": len(indices), "failed": [int(f["index"]) for f in failed], "_failures": failed,
    }


def embed_corpus(
    corpus: Any,
    encoder: str | Mapping[str, Any] | ExternalEncoder,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    split: str | None = "train",
    audio_column: str | None = None,
    overwrite: bool = False,
    max_shards: int | None = None,
    progress: bool = True,
) -> EmbedReport:
    """Computes (or resumes computing) the embedding cache of `corpus` with `encoder` in `output_dir`.

    `corpus` is anything `load_audio_corpus` accepts (a folder, a CSV, a Hub name, a Dataset). Clips are
    decoded at 16 kHz and cut to their first `max_seconds`. `max_shards` stops after computing that many
    new shards (the cache stays resumable); `overwrite` discards an existing cache in `output_dir`.
    """
    from .data import load_audio_corpus

    start_time = time.monotonic()
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    if max_seconds is not None and max_seconds <= 0:
        max_seconds = None
    encoder_spec = encoder if isinstance(encoder, str) else (dict(encoder) if isinstance(encoder, Mapping) else None)
    if not isinstance(encoder, ExternalEncoder):
        encoder = build_external_encoder(encoder, device=device)
    elif device is not None:
        encoder.to(device)
    if not encoder.requires_audio:
        raise ValueError(
            f"Encoder {encoder.name!r} only looks up precomputed embeddings; `cat-hf embed` needs an encoder that "
            "reads audio (hf:..., python:...)."
        )
    dataset = load_audio_corpus(corpus, split=split, audio_column=audio_column, label_column=False)
    num_examples = len(dataset)
    if num_examples == 0:
        raise ValueError(f"The corpus {corpus!r} has no examples; nothing to embed.")
    fingerprint = corpus_fingerprint(dataset)
    num_shards = math.ceil(num_examples / shard_size)

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    settings = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "encoder": {"name": encoder.name, "spec": encoder_spec, "embedding_dim": encoder.embedding_dim,
                    "sampling_rate": encoder.sampling_rate},
        "embedding_dim": int(encoder.embedding_dim),
        "sampling_rate": int(encoder.sampling_rate),
        "input_sampling_rate": INPUT_SAMPLING_RATE,
        "max_seconds": max_seconds,
        "corpus": {"fingerprint": fingerprint, "num_examples": num_examples, "source": str(corpus)},
        "shard_size": int(shard_size),
        "num_shards": num_shards,
    }
    if (folder / INDEX_FILE).exists():
        if overwrite:
            for path in folder.glob("shard-*.safetensors"):
                path.unlink()
            (folder / INDEX_FILE).unlink()
        else:
            _check_resumable(folder, settings)

    entries: dict[int, dict[str, Any]] = {}
    for shard in range(num_shards):
        path = folder / SHARD_PATTERN.format(shard)
        if path.exists():
            entry = _read_existing_shard(path, shard, shard_size, num_examples, encoder.embedding_dim)
            if entry is not None:
                entries[shard] = entry
    reused = len(entries)
    _write_index(folder, settings, entries)

    max_samples = None if max_seconds is None else round(max_seconds * INPUT_SAMPLING_RATE)
    todo = [k for k in range(num_shards) if k not in entries]
    if max_shards is not None:
        todo = todo[: max(0, int(max_shards))]
    bar = _progress_bar(sum(len(_shard_range(k, shard_size, num_examples)) for k in todo), progress)
    # One loader for the whole run (workers start once); batches never straddle two shards.
    batches: list[list[int]] = []
    batch_shards: list[int] = []
    for shard in todo:
        indices = list(_shard_range(shard, shard_size, num_examples))
        for first in range(0, len(indices), batch_size):
            batches.append(indices[first : first + batch_size])
            batch_shards.append(shard)
    loader = torch.utils.data.DataLoader(
        _ClipReader(dataset, max_samples), batch_sampler=batches, num_workers=num_workers, collate_fn=_collate
    )
    computed = 0
    rows: list[torch.Tensor] = []
    kept: list[int] = []
    failures: list[dict[str, Any]] = []
    for position, batch in enumerate(loader):
        shard = batch_shards[position]
        good = [(i, w) for i, w, _, _ in batch if w is not None]
        for i, w, source, reason in batch:
            if w is None:
                logger.warning("Skipping clip #%d %s: %s", i, source, reason)
                failures.append({"index": i, "source": source, "reason": reason})
        if good:
            embeddings = encoder([w for _, w in good], sampling_rate=INPUT_SAMPLING_RATE)
            rows.append(embeddings.detach().to("cpu", torch.float32))
            kept += [i for i, _ in good]
        bar.update(len(batch))
        if position + 1 < len(batches) and batch_shards[position + 1] == shard:
            continue
        # The shard is complete: write it, then record it in the index.
        indices = _shard_range(shard, shard_size, num_examples)
        path = folder / SHARD_PATTERN.format(shard)
        _atomic_save_shard(
            path, torch.cat(rows) if rows else torch.empty(0, encoder.embedding_dim),
            torch.tensor(kept, dtype=torch.int64),
            {"failed": json.dumps(failures), "encoder": encoder.name, "corpus_fingerprint": fingerprint},
        )
        entries[shard] = {
            "shard": shard, "file": path.name, "start": indices.start, "stop": indices.stop,
            "num_embeddings": len(kept), "failed": [f["index"] for f in failures], "_failures": failures,
        }
        _write_index(folder, settings, entries)
        computed += 1
        rows, kept, failures = [], [], []
    bar.close()

    failed = [f for k in sorted(entries) for f in entries[k]["_failures"]]
    return EmbedReport(
        output_dir=str(folder), num_examples=num_examples,
        num_embeddings=sum(e["num_embeddings"] for e in entries.values()), num_shards=num_shards,
        shards_computed=computed, shards_reused=reused, failed=failed, seconds=time.monotonic() - start_time,
    )


def _check_resumable(folder: Path, settings: Mapping[str, Any]) -> None:
    try:
        existing = _read_index(folder)
    except EmbeddingCacheError as err:
        raise EmbeddingCacheError(f"{err} Or pass --overwrite to start this cache over.") from err
    checks = [
        ("encoder", existing.get("encoder", {}).get("name"), settings["encoder"]["name"]),
        ("embedding_dim", existing.get("embedding_dim"), settings["embedding_dim"]),
        ("corpus fingerprint", existing.get("corpus", {}).get("fingerprint"), settings["corpus"]["fingerprint"]),
        ("shard_size", existing.get("shard_size"), settings["shard_size"]),
        ("max_seconds", existing.get("max_seconds"), settings["max_seconds"]),
    ]
    for what, old, new in checks:
        if old != new:
            raise EmbeddingCacheError(
                f"'{folder}' already holds an embedding cache with a different {what} ({old!r}, this run: {new!r}); "
                "use another --output-dir, repeat the original command to resume it, or pass --overwrite to start "
                "over."
            )


def _write_index(folder: Path, settings: Mapping[str, Any], entries: Mapping[int, Mapping[str, Any]]) -> None:
    shards = [{k: v for k, v in entries[s].items() if not k.startswith("_")} for s in sorted(entries)]
    failed = [f for s in sorted(entries) for f in entries[s]["_failures"]]
    index = {
        **settings,
        "complete": len(entries) == settings["num_shards"],
        "num_embeddings": sum(e["num_embeddings"] for e in entries.values()),
        "num_failed": len(failed),
        "failed": failed,
        "shards": shards,
    }
    atomic_write_json(folder / INDEX_FILE, index)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="clip", desc="embedding", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", help="audio corpus: a folder, a path,tags CSV/JSONL, a Hub dataset or a saved dataset")
    parser.add_argument(
        "--encoder", required=True,
        help="external encoder spec: hf:<model name or folder>[?pooling=...&layer=N], "
             "python:<module or file.py>:<function>?embedding_dim=D[&sampling_rate=SR]",
    )
    parser.add_argument("--output-dir", required=True, help="cache folder (created; an existing one is resumed)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="clips per encoder call (default %(default)s)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="examples per shard file (default %(default)s)")
    parser.add_argument(
        "--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
        help="use the first N seconds of each clip; 0 = whole clips (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default %(default)s)")
    parser.add_argument("--num-workers", type=int, default=0, help="audio decoding worker processes (default %(default)s)")
    parser.add_argument("--split", default="train", help="split of a Hub / saved dataset (default %(default)s)")
    parser.add_argument("--audio-column", default=None, help="name of the audio column when it is not detected")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing cache in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = embed_corpus(
            args.corpus, args.encoder, args.output_dir, batch_size=args.batch_size, shard_size=args.shard_size,
            max_seconds=args.max_seconds, device=device, num_workers=args.num_workers, split=args.split,
            audio_column=args.audio_column, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"cat-hf embed: error: {err}", file=sys.stderr)
        return 2
    print(report)
    if report.num_embeddings == 0:
        print("cat-hf embed: error: no clip could be embedded; check the corpus paths and formats.", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "CACHE_FORMAT",
    "INDEX_FILE",
    "EmbedReport",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "add_cli_arguments",
    "corpus_fingerprint",
    "embed_corpus",
    "run_cli",
]
