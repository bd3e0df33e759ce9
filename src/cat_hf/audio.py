"""Audio decoding for cat-hf without torchaudio or torchcodec.

Everything in the project that turns a file (or bytes, or a `datasets` row) into a waveform goes through
`load_audio`, so decoding, down-mixing and resampling behave identically in pretraining, finetuning,
embedding and evaluation. Decoding uses libsndfile (through `soundfile`: wav, flac, ogg/vorbis/opus, mp3,
aiff, ...); formats libsndfile cannot read (m4a/aac, webm, ...) fall back to the `ffmpeg` binary when it is
on PATH. Down-mixing and resampling are delegated to the feature extractor's helpers, the single source of
truth for how a waveform becomes 16 kHz mono.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import soundfile as sf

from .feature_extraction_cat import downmix_to_mono, resample_audio


logger = logging.getLogger(__name__)

#: Rate every model input is resampled to; the CAT feature extractor expects 16 kHz.
DEFAULT_SAMPLING_RATE = 16000
#: Below this no recording exists: such a rate is a broken header (resampled, a few samples at 2 Hz would become
#: hours of audio, and a run that seems to hang).
MIN_SAMPLING_RATE = 1000

#: File name endings treated as audio when scanning folders.
AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd", ".caf",
    ".w64", ".rf64", ".m4a", ".aac", ".wma", ".webm", ".mka",
)  # fmt: skip

#: Anything `load_audio` accepts: a path, encoded bytes, or a `datasets` audio dict (encoded or decoded).
AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Mapping[str, Any]]

_FFMPEG_TIMEOUT_S = 120


class AudioDecodeError(ValueError):
    """A clip could not be turned into a usable waveform.

    Carries `source` (a printable name of the file or buffer) and `reason`, so callers that skip bad clips
    can log exactly which file failed and why.
    """

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(
            f"Cannot decode audio {source}: {reason}. Fix or remove this file (or its row in the corpus); "
            "training/evaluation loaders skip such clips and count them."
        )


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of an audio file, read without decoding the samples."""

    sampling_rate: int
    num_frames: int
    num_channels: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.sampling_rate if self.sampling_rate else 0.0


def describe_audio_source(source: Any) -> str:
    """A short printable name for `source`, used in error messages and skip warnings."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes in memory>"
    if isinstance(source, Mapping):
        if source.get("path"):
            return f"'{source['path']}'"
        if source.get("bytes") is not None:
            return f"<{len(source['bytes'])} bytes in memory>"
        if "array" in source:
            return "<decoded array>"
    return f"<{type(source).__name__}>"


def load_audio(source: AudioSource, target_sr: int | None = DEFAULT_SAMPLING_RATE, *, mono: bool = True) -> np.ndarray:
    """Decode `source` to float32 samples in [-1, 1] at `target_sr` Hz.

    Args:
        source: a file path; encoded bytes; a `datasets.Audio(decode=False)` dict `{"path", "bytes"}` (bytes win
            when both are set, as in `datasets`); or a decoded dict `{"array", "sampling_rate"}`.
        target_sr: output rate; `None` keeps the file's own rate.
        mono: average the channels to one (the model input). With `mono=False` the result is
            `(channels, samples)` (a mono file gives one row).

    Returns:
        `np.ndarray` of dtype float32: 1-D `(samples,)` when `mono`, else 2-D `(channels, samples)`.

    Raises:
        AudioDecodeError: the file is missing, empty, unreadable, has zero samples, or contains NaN/inf.
    """
    name = describe_audio_source(source)
    samples, sampling_rate = _decode(source, name)  # (frames, channels) float32
    if samples.size == 0 or samples.shape[0] == 0:
        raise AudioDecodeError(name, "zero length: the file holds no audio samples")
    if not np.isfinite(samples).all():
        raise AudioDecodeError(name, "it contains NaN or infinite sample values")
    if sampling_rate is None or sampling_rate <= 0:
        raise AudioDecodeError(name, f"invalid sampling rate {sampling_rate!r}")
    check_sampling_rate(sampling_rate, name)

    channels_first = np.ascontiguousarray(samples.T)  # (channels, frames)
    if mono:
        waveform = np.asarray(downmix_to_mono(channels_first, channel_axis=0), dtype=np.float32)
        if target_sr is not None and int(sampling_rate) != int(target_sr):
            waveform = np.asarray(resample_audio(waveform, int(sampling_rate), int(target_sr)), dtype=np.float32)
        waveform = np.ascontiguousarray(waveform.reshape(-1))
        if waveform.size == 0:
            raise AudioDecodeError(name, f"zero length after resampling {sampling_rate} Hz -> {target_sr} Hz")
        return waveform

    if target_sr is not None and int(sampling_rate) != int(target_sr):
        channels_first = np.stack(
            [
                np.asarray(resample_audio(row, int(sampling_rate), int(target_sr)), dtype=np.float32)
                for row in channels_first
            ]
        )
    return np.ascontiguousarray(channels_first, dtype=np.float32)


def check_sampling_rate(rate: float, source: str) -> None:
    """AudioDecodeError for a rate below MIN_SAMPLING_RATE, naming `source`: a broken header, not audio."""
    if rate < MIN_SAMPLING_RATE:
        raise AudioDecodeError(
            source, f"its sampling rate is {rate:g} Hz, below the {MIN_SAMPLING_RATE} Hz of any audio recording (the "
            "header is wrong, or the data is not audio); write the file with its true rate"
        )


def check_mono_clip(samples: np.ndarray, what: str) -> np.ndarray:
    """`samples` when it is a non-empty 1-D waveform; else a ValueError naming `what` ("clip 3") and the fix."""
    if samples.ndim != 1:
        raise ValueError(
            f"{what} has shape {tuple(samples.shape)}; every clip must be a 1-D mono waveform (downmix "
            "multi-channel audio first, e.g. x.mean(axis=0) for (channels, samples))."
        )
    if samples.size == 0:
        raise ValueError(f"{what} is empty (0 samples); drop it or pass real audio.")
    return samples


def audio_info(source: AudioSource) -> AudioInfo:
    """Read rate, length and channel count from the header only (cheap corpus checks).

    Raises `AudioDecodeError` for missing, empty or unreadable files. Formats libsndfile cannot parse are
    fully decoded with ffmpeg instead, which is slower but gives the same answer.
    """
    name = describe_audio_source(source)
    if isinstance(source, Mapping) and "array" in source:
        array = np.asarray(source["array"])
        frames = array.shape[-1] if array.ndim else 0
        channels = array.shape[0] if array.ndim == 2 else 1
        return AudioInfo(int(source.get("sampling_rate") or 0), int(frames), int(channels))
    payload = _payload(source, name)
    try:
        info = sf.info(io.BytesIO(payload) if isinstance(payload, bytes) else payload)
        return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        samples, sampling_rate = _decode_with_ffmpeg(payload, name, err)
        return AudioInfo(int(sampling_rate), int(samples.shape[0]), int(samples.shape[1]))


def is_audio_file(path: str | os.PathLike) -> bool:
    """Whether `path` has one of the audio extensions scanned in folders (case-insensitive)."""
    return Path(path).suffix.lower() in AUDIO_EXTENSIONS


# ----------------------------------------------------------------------------------------------------------------
# decoding internals


def _payload(source: AudioSource, name: str) -> str | bytes:
    """Resolve `source` to a local path or the encoded bytes, checking the cheap failure modes first."""
    if isinstance(source, Mapping):
        if source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path"):
            source = source["path"]
        else:
            raise AudioDecodeError(name, "the audio dict has neither 'bytes' nor 'path' nor 'array'")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioDecodeError(name, "empty input (0 bytes)")
        return data
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if "://" in path and not os.path.exists(path):
            return _read_remote(path, name)
        if not os.path.exists(path):
            raise AudioDecodeError(name, "no such file")
        if os.path.isdir(path):
            raise AudioDecodeError(name, "it is a directory, not an audio file")
        if os.path.getsize(path) == 0:
            raise AudioDecodeError(name, "empty file (0 bytes)")
        return path
    raise AudioDecodeError(
        name, "unsupported source type; pass a path, bytes, or a dict with 'path'/'bytes' or 'array'/'sampling_rate'"
    )


def _read_remote(url: str, name: str) -> bytes:
    """Fetch a non-local path (hf://, https://, zip://) as `datasets` streaming rows may name one."""
    try:
        import fsspec

        with fsspec.open(url, "rb") as handle:
            data = handle.read()
    except Exception as err:  # noqa: BLE001 - any transport failure is an unreadable clip
        raise AudioDecodeError(name, f"cannot open remote path ({type(err).__name__}: {err})") from err
    if not data:
        raise AudioDecodeError(name, "empty input (0 bytes)")
    return data


def _decode(source: AudioSource, name: str) -> tuple[np.ndarray, int]:
    """Return `(frames, channels)` float32 samples and the native sampling rate."""
    if isinstance(source, Mapping) and "array" in source and source.get("array") is not None:
        return _from_decoded_dict(source, name)
    payload = _payload(source, name)
    try:
        samples, sampling_rate = sf.read(
            io.BytesIO(payload) if isinstance(payload, bytes) else payload, dtype="float32", always_2d=True
        )
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        # libsndfile does not know the container (m4a, webm, ...) or the file is damaged: ffmpeg tells which.
        return _decode_with_ffmpeg(payload, name, err)
    return samples, int(sampling_rate)


def _from_decoded_dict(source: Mapping[str, Any], name: str) -> tuple[np.ndarray, int]:
    array = np.asarray(source["array"])
    if np.issubdtype(array.dtype, np.integer):  # int PCM -> [-1, 1)
        array = array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    array = array.astype(np.float32, copy=False)
    sampling_rate = source.get("sampling_rate")
    if sampling_rate is None:
        raise AudioDecodeError(name, "the decoded dict has no 'sampling_rate'; add it next to 'array'")
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        # `datasets`/torchcodec give (channels, samples); a (samples, channels) array has more rows than columns.
        array = array.T if array.shape[0] <= array.shape[1] else array
    else:
        raise AudioDecodeError(
            name, f"the decoded array has shape {array.shape}; expected (samples,) or (channels, samples)"
        )
    return array, int(sampling_rate)


def _decode_with_ffmpeg(payload: str | bytes, name: str, sndfile_error: BaseException) -> tuple[np.ndarray, int]:
    """Decode with the ffmpeg binary as float32 PCM at the native rate and channel count."""
    reason = f"unreadable ({_clean_sndfile_message(sndfile_error)})"
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError(
            name, reason + "; installing ffmpeg adds support for more containers"
        ) from sndfile_error
    probe = _ffmpeg_stream_params(payload)
    if probe is None:
        raise AudioDecodeError(name, reason) from sndfile_error
    sampling_rate, channels = probe
    source_arg = "pipe:0" if isinstance(payload, bytes) else payload
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", source_arg, "-map", "0:a:0", "-f", "f32le",
               "-acodec", "pcm_f32le", "-ar", str(sampling_rate), "-ac", str(channels), "pipe:1"]  # fmt: skip
    try:
        result = _run_on_payload(command, payload)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AudioDecodeError(name, f"{reason}; ffmpeg failed too ({err})") from sndfile_error
    if result.returncode != 0 or not result.stdout:
        detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioDecodeError(
            name, f"{reason}; ffmpeg: {detail[-1] if detail else 'no audio decoded'}"
        ) from sndfile_error
    samples = np.frombuffer(result.stdout, dtype="<f4")
    samples = samples[: samples.size - samples.size % channels].reshape(-1, channels)
    return np.array(samples, dtype=np.float32), sampling_rate


def _ffmpeg_stream_params(payload: str | bytes) -> tuple[int, int] | None:
    """Native rate and channel count of the first audio stream, via ffprobe; None when it has none."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        return None
    command = [ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries", "stream=sample_rate,channels",
               "-of", "csv=p=0", "pipe:0" if isinstance(payload, bytes) else payload]  # fmt: skip
    try:
        result = _run_on_payload(command, payload)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = result.stdout.decode("utf-8", "replace").strip().split(",")
    if result.returncode != 0 or len(fields) < 2:
        return None
    try:
        sampling_rate, channels = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return (sampling_rate, channels) if sampling_rate > 0 and channels > 0 else None


def _run_on_payload(command: list[str], payload: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """Runs ffmpeg / ffprobe on `payload` (a path that `command` names, or bytes fed to its stdin), output captured,
    for at most `_FFMPEG_TIMEOUT_S`."""
    return subprocess.run(command, input=payload if isinstance(payload, bytes) else None, capture_output=True,
                          timeout=_FFMPEG_TIMEOUT_S, check=False)


def _clean_sndfile_message(err: BaseException) -> str:
    message = str(err)
    # libsndfile prefixes "Error opening <path>: " - the path is already in the AudioDecodeError message.
    return message.split(": ", 1)[1] if message.startswith("Error opening") and ": " in message else message
