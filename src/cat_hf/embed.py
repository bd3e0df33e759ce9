"""`cat-hf embed`: embeddings of every clip of a corpus, written to disk, resumable after a kill.

Two modes:

- `cat-hf embed CORPUS --model FOLDER --output-dir OUT [--frames]`: clip (or frame) embeddings of a CAT model
  folder, for users (`embed_audio`). Whole clips of any length (long ones go through `cat_hf.embeddings`'s
  overlapping passes). The output folder holds, once complete:

  - `embeddings.npy` (rows, D) float32, or `embeddings.parquet` with columns `clip`, `path`, [`timestamp_ms`],
    `embedding` (`--format parquet`): one row per clip, or per frame with `--frames`;
  - `timestamps.npy` (rows,) float64 ms with `--frames` (npy format);
  - `clips.csv`: `clip,path,first_row,num_rows,duration_s,error` for every example of the corpus (clips that
    cannot be read have no rows and say why);
  - `embed.json`: the model, the options, the time grid, the corpus fingerprint and `complete`.

  Clips are embedded in parts of `--shard-size` clips, each written atomically to `parts/` as it is done; running
  the same command again after a kill keeps the finished parts and computes the rest; the final files are built
  from the parts at the end (then the parts are removed).

- `cat-hf embed CORPUS --encoder SPEC --output-dir OUT`: one embedding per clip from a frozen external encoder,
  cached for Representation Regularization (`embed_corpus`; read back with `cat_hf.embedding_cache.EmbeddingCache`,
  format in that module). Clips are cut to their first `--max-seconds` (10 s by default); a run that stops part way
  is resumed by running the same command again.

Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .embedding_cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    EMBEDDINGS_KEY,
    INDEX_FILE,
    INDICES_KEY,
    SHARD_PATTERN,
    EmbeddingCache,
    EmbeddingCacheError,
    corpus_fingerprint,
    read_cache_index,
)
from .external_encoders import (
    INPUT_SAMPLING_RATE,
    ExternalEncoder,
    build_external_encoder,
)
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 1024
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_SECONDS = 10.0
_TMP_MARKER = ".tmp-"

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
# writing a cache
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EmbedReport:
    """What one `embed_corpus` / `embed_audio` run did."""

    output_dir: str
    num_examples: int
    num_embeddings: int
    num_shards: int
    shards_computed: int
    shards_reused: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    index_file: str = INDEX_FILE

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
                lines.append(f"  ... and {len(self.failed) - 20} more (see {self.index_file})")
        return "\n".join(lines)


class _ClipReader(torch.utils.data.Dataset):
    """Decodes clips of the corpus at `sampling_rate` by example index: (index, waveform, source, reason), with
    waveform None and the reason when the clip cannot be read."""

    def __init__(self, dataset: Any, max_samples: int | None, sampling_rate: int = INPUT_SAMPLING_RATE) -> None:
        self.dataset = dataset
        self.max_samples = max_samples
        self.sampling_rate = sampling_rate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str, str]:
        from .audio import describe_audio_source, load_audio

        entry = None
        try:
            entry = self.dataset[index]["audio"]
            waveform = load_audio(entry, target_sr=self.sampling_rate)
        except Exception as err:  # noqa: BLE001 - an unreadable clip is skipped and reported, never fatal
            reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
            source = describe_audio_source(entry).strip("'") if entry is not None else f"#{index}"
            return index, None, source, str(reason)
        if self.max_samples is not None:
            waveform = waveform[: self.max_samples]
        return index, waveform, describe_audio_source(entry).strip("'"), ""


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


def _pending_batches(
    reader: _ClipReader,
    done: Mapping[int, Any],
    num_shards: int,
    shard_size: int,
    batch_size: int,
    max_shards: int | None,
    num_workers: int,
    progress: bool,
) -> Iterator[tuple[int, list[tuple[int, np.ndarray, str]], list[dict[str, Any]], bool]]:
    """The clips of the shards not `done` (the first `max_shards` of them), decoded by one DataLoader for the whole
    run (its workers start once) in batches that never straddle two shards, under a progress bar. Yields
    `(shard, readable, unreadable, shard_complete)`: readable clips as (index, waveform, source), unreadable ones
    (logged) as {"index", "source", "reason"}, and whether this batch was the shard's last."""
    num_examples = len(reader)
    todo = [k for k in range(num_shards) if k not in done]
    if max_shards is not None:
        todo = todo[: max(0, int(max_shards))]
    batches: list[list[int]] = []
    batch_shards: list[int] = []
    for shard in todo:
        indices = list(_shard_range(shard, shard_size, num_examples))
        for first in range(0, len(indices), batch_size):
            batches.append(indices[first : first + batch_size])
            batch_shards.append(shard)
    loader = torch.utils.data.DataLoader(reader, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate)
    bar = _progress_bar(sum(len(batch) for batch in batches), progress)
    for position, batch in enumerate(loader):
        shard = batch_shards[position]
        readable = [(i, w, source) for i, w, source, _ in batch if w is not None]
        unreadable = []
        for i, w, source, reason in batch:
            if w is None:
                logger.warning("Skipping clip #%d %s: %s", i, source, reason)
                unreadable.append({"index": i, "source": source, "reason": reason})
        yield shard, readable, unreadable, position + 1 == len(batches) or batch_shards[position + 1] != shard
        bar.update(len(batch))
    bar.close()


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
    computed = 0
    rows: list[torch.Tensor] = []
    kept: list[int] = []
    failures: list[dict[str, Any]] = []
    for shard, good, failed, shard_done in _pending_batches(
        _ClipReader(dataset, max_samples), entries, num_shards, shard_size, batch_size, max_shards, num_workers,
        progress,
    ):
        failures += failed
        if good:
            embeddings = encoder([w for _, w, _ in good], sampling_rate=INPUT_SAMPLING_RATE)
            rows.append(embeddings.detach().to("cpu", torch.float32))
            kept += [i for i, _, _ in good]
        if not shard_done:
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

    failed = [f for k in sorted(entries) for f in entries[k]["_failures"]]
    return EmbedReport(
        output_dir=str(folder), num_examples=num_examples,
        num_embeddings=sum(e["num_embeddings"] for e in entries.values()), num_shards=num_shards,
        shards_computed=computed, shards_reused=reused, failed=failed, seconds=time.monotonic() - start_time,
    )


def _check_resumable(folder: Path, settings: Mapping[str, Any]) -> None:
    try:
        existing = read_cache_index(folder)
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
# embeddings of a CAT model (for users)
# ---------------------------------------------------------------------------------------------------------

OUTPUT_INDEX = "embed.json"
OUTPUT_FORMAT = "cat-hf-embeddings"
OUTPUT_VERSION = 1
OUTPUT_FORMATS = ("npy", "parquet")
PARTS_FOLDER = "parts"
PART_PATTERN = "part-{:05d}.npz"
CLIPS_FILE = "clips.csv"
DEFAULT_MODEL_SHARD_SIZE = 64
DEFAULT_MODEL_BATCH_SIZE = 8
_FINAL_FILES = ("embeddings.npy", "timestamps.npy", "embeddings.parquet", CLIPS_FILE)


def _remove_stale_output_temporaries(folder: Path) -> None:
    """Temporary files of a killed run: every hidden file in parts/ (a folder of ours), ours in `folder`."""
    for path in (folder / PARTS_FOLDER).glob(".*"):
        if path.is_file():
            path.unlink(missing_ok=True)
    for name in (OUTPUT_INDEX, *_FINAL_FILES):
        for path in folder.glob(f".{name}*"):
            if path.is_file():
                path.unlink(missing_ok=True)


def _model_fingerprint(model: torch.nn.Module) -> str:
    """Identity of the weights: a hash of every parameter and buffer (so that a retrained folder is noticed)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def embed_audio(
    corpus: Any,
    model: str | os.PathLike | Any,
    output_dir: str | os.PathLike,
    *,
    frames: bool = False,
    output_format: str = "npy",
    batch_size: int = DEFAULT_MODEL_BATCH_SIZE,
    shard_size: int = DEFAULT_MODEL_SHARD_SIZE,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    split: str | None = "train",
    audio_column: str | None = None,
    overwrite: bool = False,
    max_shards: int | None = None,
    progress: bool = True,
    **options: Any,
) -> EmbedReport:
    """Writes (or resumes writing) the clip or frame embeddings of every clip of `corpus` to `output_dir`.

    `corpus` is anything `load_audio_corpus` reads; `model` a CAT model folder (or a `CATEmbedder`); `options` are
    `CATEmbedder` options (layer, frequency, pooling, hop_ms, chunk_seconds, chunk_overlap_seconds). The layout of
    `output_dir` is in the module docstring. `max_shards` stops after that many new parts (the run stays
    resumable); `overwrite` discards what `output_dir` holds from an earlier run.
    """
    from .data import load_audio_corpus
    from .embeddings import CATEmbedder

    start_time = time.monotonic()
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format!r} is not supported; use one of {OUTPUT_FORMATS}.")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    if isinstance(model, CATEmbedder):
        if options:
            raise ValueError(f"options {sorted(options)} are set on the CATEmbedder itself; pass them when building it.")
        embedder, model_name = model, type(model.model).__name__
        if device is not None:
            embedder.model.to(device)
    else:
        embedder = CATEmbedder.from_pretrained(model, device=device, batch_size=batch_size, **options)
        model_name = os.path.abspath(os.fspath(model)) if os.path.isdir(model) else os.fspath(model)
    dataset = load_audio_corpus(corpus, split=split, audio_column=audio_column, label_column=False)
    num_examples = len(dataset)
    if num_examples == 0:
        raise ValueError(f"The corpus {corpus!r} has no examples; nothing to embed.")
    num_shards = math.ceil(num_examples / shard_size)
    settings = {
        "format": OUTPUT_FORMAT,
        "version": OUTPUT_VERSION,
        "model": {"name": model_name, "fingerprint": _model_fingerprint(embedder.model)},
        "kind": "frames" if frames else "clips",
        "output_format": output_format,
        "options": {
            "layer": list(embedder.layers) if embedder.layers is not None else None,
            "frequency": embedder.frequency, "pooling": embedder.pooling,
            "chunk_patches": embedder.chunk_patches, "overlap_patches": embedder.overlap_patches,
        },
        "embedding_dim": embedder.frame_embedding_size if frames else embedder.clip_embedding_size,
        "sampling_rate": embedder.sampling_rate,
        "time_grid": {"hop_ms": embedder.hop_ms, "centre_offset_ms": embedder.centre_offset_ms,
                      "max_pass_seconds": embedder.max_pass_seconds} if frames else None,
        "corpus": {"fingerprint": corpus_fingerprint(dataset), "num_examples": num_examples, "source": str(corpus)},
        "shard_size": int(shard_size),
        "num_shards": num_shards,
    }

    folder = Path(output_dir)
    parts = folder / PARTS_FOLDER
    if overwrite:
        for name in (OUTPUT_INDEX, *_FINAL_FILES):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    _remove_stale_output_temporaries(folder)
    existing = _read_output_index(folder)
    if existing is not None:
        _check_same_run(folder, existing, settings)
        if existing.get("complete"):
            return _report_of(folder, existing, computed=0, reused=num_shards, start_time=start_time)

    entries: dict[int, dict[str, Any]] = {}
    for shard in range(num_shards):
        entry = _read_part(parts / PART_PATTERN.format(shard), shard,
                           _shard_range(shard, shard_size, num_examples), settings["embedding_dim"], frames)
        if entry is not None:
            entries[shard] = entry
    reused = len(entries)
    _write_output_index(folder, settings, entries, complete=False)

    computed = 0
    part = _PartBuilder(frames)
    for shard, good, failed, shard_done in _pending_batches(
        _ClipReader(dataset, None, embedder.sampling_rate), entries, num_shards, shard_size, batch_size, max_shards,
        num_workers, progress,
    ):
        part.failures += failed
        if good:
            waves = [w for _, w, _ in good]
            if frames:
                result = embedder.frame_embeddings(waves, sampling_rate=embedder.sampling_rate)
                for row, (i, w, source) in enumerate(good):
                    vectors, stamps = result.clip(row)
                    part.add(i, source, len(w) / embedder.sampling_rate, vectors, stamps)
            else:
                vectors = embedder.clip_embeddings(waves, sampling_rate=embedder.sampling_rate)
                for row, (i, w, source) in enumerate(good):
                    part.add(i, source, len(w) / embedder.sampling_rate, vectors[row : row + 1], None)
        if not shard_done:
            continue
        entries[shard] = part.save(parts / PART_PATTERN.format(shard), shard, settings["embedding_dim"])
        _write_output_index(folder, settings, entries, complete=False)
        computed += 1
        part = _PartBuilder(frames)

    if len(entries) == num_shards:
        _assemble(folder, settings, entries, frames, output_format)
        _write_output_index(folder, settings, entries, complete=True)
        shutil.rmtree(parts, ignore_errors=True)
    return _report_of(folder, _read_output_index(folder), computed=computed, reused=reused, start_time=start_time)


class _PartBuilder:
    """The rows of one part (shard of clips) while it is computed."""

    def __init__(self, frames: bool) -> None:
        self.frames = frames
        self.embeddings: list[np.ndarray] = []
        self.timestamps: list[np.ndarray] = []
        self.clips: list[int] = []
        self.sources: list[str] = []
        self.rows: list[int] = []
        self.durations: list[float] = []
        self.failures: list[dict[str, Any]] = []

    def add(self, clip: int, source: str, duration: float, vectors: torch.Tensor, stamps: torch.Tensor | None) -> None:
        self.embeddings.append(vectors.numpy().astype(np.float32, copy=False))
        if stamps is not None:
            self.timestamps.append(stamps.numpy().astype(np.float64, copy=False))
        self.clips.append(clip)
        self.sources.append(source)
        self.rows.append(vectors.shape[0])
        self.durations.append(duration)

    def save(self, path: Path, shard: int, dim: int) -> dict[str, Any]:
        arrays = {
            "embeddings": np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float32),
            "clips": np.asarray(self.clips, dtype=np.int64),
            "rows": np.asarray(self.rows, dtype=np.int64),
            "durations": np.asarray(self.durations, dtype=np.float64),
            "meta": np.asarray(json.dumps({"sources": self.sources, "failures": self.failures})),
        }
        if self.frames:
            arrays["timestamps"] = np.concatenate(self.timestamps) if self.timestamps else np.zeros(0)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return _part_entry(path, shard, arrays, self.sources, self.failures)


def _part_entry(path: Path, shard: int, arrays: Mapping[str, np.ndarray], sources: list[str],
                failures: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "shard": shard, "file": f"{PARTS_FOLDER}/{path.name}", "num_embeddings": len(arrays["clips"]),
        "num_rows": int(arrays["rows"].sum()), "failed": [int(f["index"]) for f in failures],
        "_failures": failures, "_sources": sources,
    }


def _read_part(path: Path, shard: int, expected: range, dim: int, frames: bool) -> dict[str, Any] | None:
    """The index entry of a complete, consistent part file, else None (the part gets recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(str(arrays["meta"]))
        sources, failures = meta["sources"], meta["failures"]
        embeddings, clips, rows = arrays["embeddings"], arrays["clips"], arrays["rows"]
        ok = (
            embeddings.ndim == 2 and embeddings.shape[1] == dim and len(rows) == len(clips) == len(sources)
            and int(rows.sum()) == embeddings.shape[0]
            and sorted(clips.tolist() + [int(f["index"]) for f in failures]) == list(expected)
            and (not frames or arrays["timestamps"].shape == (embeddings.shape[0],))
        )
    except Exception as err:  # noqa: BLE001 - a damaged part is simply recomputed
        logger.warning("Recomputing damaged part '%s' (%s).", path, err)
        return None
    if not ok:
        logger.warning("Recomputing part '%s': its contents do not match this run.", path)
        return None
    return _part_entry(path, shard, arrays, sources, failures)


def _load_part(folder: Path, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    with np.load(folder / entry["file"], allow_pickle=False) as data:
        return {key: data[key] for key in data.files if key != "meta"}


def _assemble(folder: Path, settings: Mapping[str, Any], entries: Mapping[int, Mapping[str, Any]], frames: bool,
              output_format: str) -> None:
    """Builds the final files from the parts (each written to a temporary name and renamed)."""
    shards = sorted(entries)
    total = sum(int(entries[s]["num_rows"]) for s in shards)
    dim = int(settings["embedding_dim"])
    table_rows: list[str] = ["clip,path,first_row,num_rows,duration_s,error"]
    first_row = 0
    records: dict[int, str] = {}
    for s in shards:
        arrays = _load_part(folder, entries[s])
        for clip, source, rows, duration in zip(arrays["clips"].tolist(), entries[s]["_sources"],
                                                arrays["rows"].tolist(), arrays["durations"].tolist()):
            records[clip] = f"{clip},{_csv(source)},{first_row},{rows},{duration:.6f},"
            first_row += rows
        for failure in entries[s]["_failures"]:
            records[int(failure["index"])] = f"{failure['index']},{_csv(failure['source'])},,0,,{_csv(failure['reason'])}"
    table_rows += [records[i] for i in sorted(records)]

    if output_format == "npy":
        _write_npy(folder / "embeddings.npy", (total, dim), np.float32, folder, entries, shards, "embeddings")
        if frames:
            _write_npy(folder / "timestamps.npy", (total,), np.float64, folder, entries, shards, "timestamps")
    else:
        _write_parquet(folder / "embeddings.parquet", dim, folder, entries, shards, frames)
    atomic_write_text(folder / CLIPS_FILE, "\n".join(table_rows) + "\n")


def _csv(text: str) -> str:
    text = str(text)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def _write_npy(path: Path, shape: tuple[int, ...], dtype: Any, folder: Path, entries: Mapping[int, Mapping[str, Any]],
               shards: Sequence[int], key: str) -> None:
    temporary = _temporary_path(path)
    try:
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        row = 0
        for s in shards:
            values = _load_part(folder, entries[s])[key]
            array[row : row + len(values)] = values
            row += len(values)
        array.flush()
        del array
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_parquet(path: Path, dim: int, folder: Path, entries: Mapping[int, Mapping[str, Any]],
                   shards: Sequence[int], frames: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [("clip", pa.int64()), ("path", pa.string())]
    if frames:
        columns.append(("timestamp_ms", pa.float64()))
    columns.append(("embedding", pa.list_(pa.float32(), dim)))
    schema = pa.schema(columns)
    temporary = _temporary_path(path)
    try:
        with pq.ParquetWriter(temporary, schema) as writer:
            for s in shards:
                arrays = _load_part(folder, entries[s])
                rows = arrays["rows"]
                data = {
                    "clip": np.repeat(arrays["clips"], rows),
                    "path": np.repeat(np.asarray(entries[s]["_sources"], dtype=object), rows),
                }
                if frames:
                    data["timestamp_ms"] = arrays["timestamps"]
                flat = pa.array(arrays["embeddings"].reshape(-1), type=pa.float32())
                data["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
                writer.write_table(pa.table(data, schema=schema))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_output_index(folder: Path) -> dict[str, Any] | None:
    path = folder / OUTPUT_INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON ({err}); pass --overwrite to start this output over.") from err
    if index.get("format") != OUTPUT_FORMAT:
        raise ValueError(f"'{path}' was not written by `cat-hf embed --model`; use another --output-dir.")
    return index


def _check_same_run(folder: Path, existing: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    for key in ("version", "model", "kind", "output_format", "options", "embedding_dim", "sampling_rate",
                "time_grid", "corpus", "shard_size"):
        old, new = existing.get(key), settings[key]
        if key in ("corpus", "model"):  # the same clips / weights, wherever they are now
            old, new = (old or {}).get("fingerprint"), new["fingerprint"]
        if old != new:
            raise ValueError(
                f"'{folder}' already holds embeddings with a different {key} ({old!r}, this run: {new!r}); use "
                "another --output-dir, repeat the original command to resume it, or pass --overwrite to start over."
            )


def _write_output_index(folder: Path, settings: Mapping[str, Any], entries: Mapping[int, Mapping[str, Any]],
                        complete: bool) -> None:
    shards = [{k: v for k, v in entries[s].items() if not k.startswith("_")} for s in sorted(entries)]
    failed = [f for s in sorted(entries) for f in entries[s]["_failures"]]
    index = {
        **settings,
        "complete": complete,
        "files": (["embeddings.npy"] + (["timestamps.npy"] if settings["kind"] == "frames" else [])
                  if settings["output_format"] == "npy" else ["embeddings.parquet"]) + [CLIPS_FILE],
        "num_embeddings": sum(e["num_embeddings"] for e in entries.values()),
        "num_rows": sum(e["num_rows"] for e in entries.values()),
        "num_failed": len(failed),
        "failed": failed,
        "shards": [] if complete else shards,
    }
    atomic_write_json(folder / OUTPUT_INDEX, index)


def _report_of(folder: Path, index: Mapping[str, Any], *, computed: int, reused: int, start_time: float) -> EmbedReport:
    return EmbedReport(
        output_dir=str(folder), num_examples=int(index["corpus"]["num_examples"]),
        num_embeddings=int(index["num_embeddings"]), num_shards=int(index["num_shards"]), shards_computed=computed,
        shards_reused=reused, failed=list(index["failed"]), seconds=time.monotonic() - start_time,
        index_file=OUTPUT_INDEX,
    )


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", help="audio corpus: a folder, a path,tags CSV/JSONL, a Hub dataset or a saved dataset")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", help="CAT model folder: write its clip (or --frames) embeddings of every clip to --output-dir",
    )
    source.add_argument(
        "--encoder",
        help="external encoder spec, to cache RR targets: hf:<model name or folder>[?pooling=...&layer=N], "
             "python:<module or file.py>:<function>?embedding_dim=D[&sampling_rate=SR]",
    )
    parser.add_argument("--output-dir", required=True, help="output folder (created; an unfinished one is resumed)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"clips per call (default {DEFAULT_MODEL_BATCH_SIZE} with --model, {DEFAULT_BATCH_SIZE} "
                             "with --encoder)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help=f"clips per part / shard file, the unit of resuming (default {DEFAULT_MODEL_SHARD_SIZE} "
                             f"with --model, {DEFAULT_SHARD_SIZE} with --encoder)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default %(default)s)")
    parser.add_argument("--num-workers", type=int, default=0, help="audio decoding worker processes (default %(default)s)")
    parser.add_argument("--split", default="train", help="split of a Hub / saved dataset (default %(default)s)")
    parser.add_argument("--audio-column", default=None, help="name of the audio column when it is not detected")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing output in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    model = parser.add_argument_group("with --model (CAT embeddings; whole clips of any length)")
    model.add_argument("--frames", action="store_true", help="frame embeddings with timestamps instead of one per clip")
    model.add_argument("--format", choices=OUTPUT_FORMATS, default="npy",
                       help="embeddings.npy (+ timestamps.npy) or embeddings.parquet (default %(default)s)")
    model.add_argument("--hop-ms", type=float, default=None,
                       help="hop of frame embeddings: 160 (one patch, default), 80, 40, 20 or 10 ms")
    model.add_argument("--layer", type=int, nargs="+", default=None,
                       help="hidden state(s) to use, averaged: 0 = input of the first block, -1 = last (default)")
    model.add_argument("--frequency", choices=("mean", "concat"), default="mean",
                       help="average or concatenate the frequency tokens of a patch (default %(default)s)")
    model.add_argument("--pooling", choices=("cls", "mean"), default=None,
                       help="clip embedding: CLS token or mean of the patch tokens (default: the model config's)")
    rr = parser.add_argument_group("with --encoder (RR target cache)")
    rr.add_argument(
        "--max-seconds", type=float, default=None,
        help=f"use the first N seconds of each clip; 0 = whole clips (default {DEFAULT_MAX_SECONDS:g})",
    )


def run_cli(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.model is not None:
            if args.max_seconds is not None:
                raise ValueError("--max-seconds is for --encoder caches; --model embeds whole clips of any length.")
            layer = args.layer[0] if args.layer and len(args.layer) == 1 else args.layer
            report = embed_audio(
                args.corpus, args.model, args.output_dir, frames=args.frames, output_format=args.format,
                batch_size=args.batch_size or DEFAULT_MODEL_BATCH_SIZE,
                shard_size=args.shard_size or DEFAULT_MODEL_SHARD_SIZE, device=device, num_workers=args.num_workers,
                split=args.split, audio_column=args.audio_column, overwrite=args.overwrite,
                progress=not args.no_progress, hop_ms=args.hop_ms, layer=layer, frequency=args.frequency,
                pooling=args.pooling,
            )
        else:
            model_only = [flag for flag, value in (("--frames", args.frames), ("--hop-ms", args.hop_ms),
                                                   ("--layer", args.layer), ("--pooling", args.pooling),
                                                   ("--format", args.format != "npy" or None),
                                                   ("--frequency", args.frequency != "mean" or None)) if value]
            if model_only:
                raise ValueError(f"{', '.join(model_only)} apply to --model embeddings, not to --encoder caches.")
            report = embed_corpus(
                args.corpus, args.encoder, args.output_dir, batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
                shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
                max_seconds=DEFAULT_MAX_SECONDS if args.max_seconds is None else args.max_seconds, device=device,
                num_workers=args.num_workers, split=args.split, audio_column=args.audio_column,
                overwrite=args.overwrite, progress=not args.no_progress,
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
    "OUTPUT_INDEX",
    "EmbedReport",
    "EmbeddingCache",
    "EmbeddingCacheError",
    "add_cli_arguments",
    "corpus_fingerprint",
    "embed_audio",
    "embed_corpus",
    "run_cli",
]
