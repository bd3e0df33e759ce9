"""Benchmark: CATFeatureExtractor (batched torch) vs transformers' ASTFeatureExtractor on the same clips.

Both compute the Kaldi log-mel fbank of the AST/CAT recipe (128 bins, 25 ms / 10 ms, 1024 frames). AST works clip
by clip (torchaudio when importable, else its numpy path, which loops over frames in Python); CAT does the whole
batch in one pass. Prints a markdown table and the speed ratio measured in this run.

    python benchmarks/bench_feature_extraction.py [--clips 64] [--seconds 10] [--repeats 5] [--threads 2] [--settle 0.3]

Run it on a quiet machine: the 1-min load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import ASTFeatureExtractor
from transformers.utils import is_speech_available

from cat_hf.feature_extraction_cat import CATFeatureExtractor


def make_clips(num_clips: int, seconds: float, sampling_rate: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """Random float32 clips in [-1, 1): Gaussian noise with a random tone, so the spectra are not flat."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    clips = []
    for _ in range(num_clips):
        tone = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        clips.append(np.clip(tone + 0.1 * rng.standard_normal(t.shape), -1, 1).astype(np.float32))
    return clips


def time_interleaved(
    runs: dict[str, Callable[[], object]], repeats: int, settle: float = 0.3
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Times the runs round-robin, so that background load affects all of them alike, each in a steady state.

    Before each timed call: a `settle` s pause, then one untimed call of the same run. The pause lets the worker
    threads of the previous run go idle (OpenBLAS's, used by numpy in the AST path, keep spinning for ~0.1 s and on
    a 2-core machine take a core from whatever runs next: CAT measured 2-3x slower right after an AST call); the
    untimed call brings the CPU clock and caches back up after the pause, as in a loop over batches.
    Returns wall-clock and process CPU seconds per run; on a busy machine the CPU time shows how much of the wall
    time was spent waiting for a core.
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
    parser.add_argument("--device", default="cpu", help="device of the CAT extractor (AST always runs on CPU)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clips = make_clips(args.clips, args.seconds)
    cat = CATFeatureExtractor()
    ast = ASTFeatureExtractor()
    ast_path = "torchaudio" if is_speech_available() else "numpy"

    def run_cat() -> torch.Tensor:
        values = cat(clips, sampling_rate=16000, return_tensors="pt", device=args.device)["input_values"]
        if values.is_cuda:
            torch.cuda.synchronize()
        return values

    def run_ast() -> torch.Tensor:
        return ast(clips, sampling_rate=16000, return_tensors="pt")["input_values"]

    wall, cpu = time_interleaved({"cat": run_cat, "ast": run_ast}, args.repeats, args.settle)
    cat_s, ast_s = statistics.median(wall["cat"]), statistics.median(wall["ast"])
    cat_cpu, ast_cpu = statistics.median(cpu["cat"]), statistics.median(cpu["ast"])

    # Sanity check: same recipe, so the features agree except for float32 noise in very quiet bins.
    diff = (run_cat().cpu() - run_ast()).abs()
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    print(
        f"{args.clips} clips x {args.seconds:g} s at 16 kHz, torch threads {args.threads}, "
        f"median of {args.repeats}, each after a {args.settle:g} s pause and an untimed call; AST path: {ast_path}; "
        f"CAT device: {args.device}; "
        f"{os.cpu_count()} CPUs, 1-min load average {load}"
    )
    print()
    print("| extractor | seconds | clips/s | CPU seconds |")
    print("|---|---:|---:|---:|")
    print(
        f"| CATFeatureExtractor (batched torch, {args.device}) | {cat_s:.3f} | {args.clips / cat_s:.1f} "
        f"| {cat_cpu:.3f} |"
    )
    print(f"| ASTFeatureExtractor ({ast_path}) | {ast_s:.3f} | {args.clips / ast_s:.1f} | {ast_cpu:.3f} |")
    print()
    print(f"speed-up CAT / AST (wall clock, same run): {ast_s / cat_s:.1f}x")
    print(
        f"feature agreement with AST: median |diff| {diff.median():.2e}, 99.9th percentile "
        f"{diff.flatten().kthvalue(int(diff.numel() * 0.999)).values:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
