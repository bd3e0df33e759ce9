"""Benchmark: CATFeatureExtractor (batched torch) vs transformers' ASTFeatureExtractor and torchaudio's kaldi.fbank.

All compute the Kaldi log-mel fbank of the AST/CAT recipe (128 bins, 25 ms / 10 ms, 1024 frames) of the same clips.
AST works clip by clip (torchaudio when importable, else its numpy path, which loops over frames in Python); the
kaldi peer is a per-clip loop of ``torchaudio.compliance.kaldi.fbank`` (the original CAT pipeline); CAT does the whole
batch in one pass. Prints a markdown table and the speed ratios measured in this run.

    python benchmarks/bench_feature_extraction.py [--clips 64] [--seconds 10] [--repeats 5] [--threads 2]
        [--settle 0.3] [--chunk-frames 1024] [--kaldi-file PATH]

The kaldi column appears when ``torchaudio/compliance/kaldi.py`` is found: `--kaldi-file`, else $CAT_KALDI_FILE, else
the file inside an installed torchaudio. That file is pure PyTorch and is loaded on its own, so torchaudio's compiled
parts need not import; without torchaudio, fetch it with e.g.
``pip download --no-deps torchaudio==2.9.1 -d /tmp/ta && python -m zipfile -e /tmp/ta/torchaudio-*.whl /tmp/ta/whl``
and pass ``--kaldi-file /tmp/ta/whl/torchaudio/compliance/kaldi.py``.

Run it on a quiet machine: the 1-min load average is printed with the results; compare only ratios of one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import ASTFeatureExtractor
from transformers.utils import is_speech_available

from cat_hf.feature_extraction_cat import FEATURE_PRESETS, CATFeatureExtractor


def make_clips(num_clips: int, seconds: float, sampling_rate: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """Random float32 clips in [-1, 1): Gaussian noise with a random tone, so the spectra are not flat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    clips = []
    for _ in range(num_clips):
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        clips.append(np.clip(tone + 0.1 * rng.standard_normal(t.shape), -1, 1).astype(np.float32))
    return clips


def find_kaldi_file(given: str | None) -> Path | None:
    """torchaudio's compliance/kaldi.py: `given`, $CAT_KALDI_FILE, or the one of an installed torchaudio."""
    candidates = [given, os.environ.get("CAT_KALDI_FILE")]
    spec = importlib.util.find_spec("torchaudio")  # locates the package without importing it
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "compliance" / "kaldi.py"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    if given:
        raise SystemExit(f"--kaldi-file {given} does not exist.")
    return None


def load_kaldi(path: Path) -> types.ModuleType:
    """Imports the single file. Its `import torchaudio` (used only by mfcc) gets an empty stand-in while it loads."""
    previous = sys.modules.get("torchaudio")
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        spec = importlib.util.spec_from_file_location("torchaudio_compliance_kaldi", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del sys.modules["torchaudio"]
        else:
            sys.modules["torchaudio"] = previous
    return module


def time_interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, settle: float = 0.3
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times the runs round-robin, so that background load affects all of them alike, each in a steady state.

    Before each timed call: a `settle` s pause, then one untimed call of the same run. The pause lets the worker
    threads of the previous run go idle (OpenBLAS's, used by numpy in the AST path, keep spinning for ~0.1 s and on
    a 2-core machine take a core from whatever runs next); the untimed call brings the CPU clock and caches back up
    after the pause, as in a loop over batches. Returns wall-clock and process CPU seconds per run; on a busy machine
    the CPU time shows how much of the wall time was spent waiting for a core.
    """
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(settle)
            run()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settle", type=float, default=0.3, help="pause in seconds before each timed run")
    parser.add_argument("--device", default="cpu", help="device of the CAT extractor (the peers run on CPU)")
    parser.add_argument("--chunk-frames", type=int, default=None, help="CAT's chunk_frames (default: its own)")
    parser.add_argument("--kaldi-file", default=None, help="path of torchaudio/compliance/kaldi.py (see above)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")  # AST's 128-bin filters
    clips = make_clips(args.clips, args.seconds)
    cat = CATFeatureExtractor(**({"chunk_frames": args.chunk_frames} if args.chunk_frames else {}))
    ast = ASTFeatureExtractor()
    ast_path = "torchaudio" if is_speech_available() else "numpy"
    kaldi_file = find_kaldi_file(args.kaldi_file)
    kaldi = load_kaldi(kaldi_file) if kaldi_file else None
    stats = FEATURE_PRESETS["audioset"]

    def run_cat() -> torch.Tensor:
        values = cat(clips, sampling_rate=16000, return_tensors="pt", device=args.device)["input_values"]
        if values.is_cuda:
            torch.cuda.synchronize()
        return values

    def run_ast() -> torch.Tensor:
        return ast(clips, sampling_rate=16000, return_tensors="pt")["input_values"]

    def run_kaldi() -> torch.Tensor:
        """The original CAT pipeline, clip by clip: mean subtraction, fbank, pad/cut to 1024 frames, normalise."""
        rows = []
        for clip in clips:
            wave = torch.from_numpy(clip).unsqueeze(0)
            fbank = kaldi.fbank(wave - wave.mean(), htk_compat=True, sample_frequency=16000, use_energy=False,
                                window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)  # fmt: skip
            fbank = torch.nn.functional.pad(fbank, (0, 0, 0, max(0, 1024 - fbank.shape[0])))[:1024]
            rows.append((fbank - stats["mean"]) / (2 * stats["std"]))
        return torch.stack(rows)

    runs = {"cat": run_cat, "ast": run_ast} | ({"kaldi": run_kaldi} if kaldi else {})
    wall, cpu = time_interleaved(runs, args.repeats, args.settle)
    median = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}

    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    print(
        f"{args.clips} clips x {args.seconds:g} s at 16 kHz, torch threads {args.threads}, median of {args.repeats}, "
        f"each after a {args.settle:g} s pause and an untimed call; AST path: {ast_path}; CAT device: {args.device}, "
        f"chunk_frames {cat.chunk_frames}; kaldi peer: {kaldi_file or 'not found (see --kaldi-file)'}; "
        f"{os.cpu_count()} CPUs, 1-min load average {load}"
    )
    print()
    print("| extractor | seconds | clips/s | CPU seconds |")
    print("|---|---:|---:|---:|")
    names = {
        "cat": f"CATFeatureExtractor (batched torch, {args.device})",
        "ast": f"ASTFeatureExtractor ({ast_path})",
        "kaldi": "torchaudio kaldi.fbank, per-clip loop",
    }
    for name in runs:
        print(f"| {names[name]} | {median[name]:.3f} | {args.clips / median[name]:.1f} | {median_cpu[name]:.3f} |")
    print()
    features = run_cat().cpu()
    for name, run in runs.items():
        if name == "cat":
            continue
        diff = (features - run()).abs()
        print(
            f"speed-up CAT / {name} (wall clock, same run): {median[name] / median['cat']:.1f}x; features: median "
            f"|diff| {diff.median():.2e}, 99.9th percentile {diff.flatten().kthvalue(int(diff.numel() * 0.999)).values:.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
