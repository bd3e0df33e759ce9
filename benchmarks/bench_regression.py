"""Did a change make cat-hf slower? The encoder and the feature extractor of this checkout against those of an earlier
git revision, in one process, interleaved, median of `--repeats` (ratios only: on a shared machine the absolute
times drift, the ratio of two interleaved measurements much less).

    python benchmarks/bench_regression.py --revision 035784a [--threads 1] [--repeats 5]

The revision's `src/` is exported with `git archive` into a temporary folder and imported under another package
name; both encoders get the same weights and input (their outputs are compared first), both extractors the same
clips. A time ratio (this checkout / revision) near 1 means the speeds measured at that revision beside their peers
(README, Results) still hold.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def import_revision(revision: str, folder: Path):
    """The package `cat_hf` of `revision`, imported as `cat_hf_at_revision`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "src/cat_hf"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "src" / "cat_hf"
    spec = importlib.util.spec_from_file_location("cat_hf_at_revision", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cat_hf_at_revision"] = module
    spec.loader.exec_module(module)
    return module


def interleaved(calls: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up
    for i in range(repeats):
        for name in (list(calls) if i % 2 == 0 else list(reversed(calls))):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="cat-base")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import cat_hf

    with tempfile.TemporaryDirectory() as folder:
        old = import_revision(args.revision, Path(folder))
        new_model = cat_hf.CATModel(cat_hf.CATConfig.from_preset(args.preset)).eval()
        old_model = old.CATModel(old.CATConfig.from_preset(args.preset)).eval()
        old_model.load_state_dict(new_model.state_dict())
        spectrogram = torch.randn(8, 1024, 128)
        rng = np.random.default_rng(0)
        clips = [0.1 * rng.standard_normal(160000).astype(np.float32) for _ in range(64)]
        new_fe, old_fe = cat_hf.CATFeatureExtractor(), old.CATFeatureExtractor()
        fe_difference = np.abs(new_fe(clips, sampling_rate=16000, return_tensors="np")["input_values"]
                               - old_fe(clips, sampling_rate=16000, return_tensors="np")["input_values"]).max()
        with torch.inference_mode():
            difference = (new_model(spectrogram).last_hidden_state - old_model(spectrogram).last_hidden_state).abs().max()
            encoder = interleaved({"this checkout": lambda: new_model(spectrogram),
                                   args.revision: lambda: old_model(spectrogram)}, args.repeats)
        features = interleaved({"this checkout": lambda: new_fe(clips, sampling_rate=16000, return_tensors="pt"),
                                args.revision: lambda: old_fe(clips, sampling_rate=16000, return_tensors="pt")},
                               args.repeats)
    print(f"\n{args.preset} encoder (8 x 10.24 s) and feature extractor (64 x 10 s), {args.threads} thread(s), "
          f"median of {args.repeats} interleaved; outputs differ by {float(difference):.1e} / {float(fe_difference):.1e}\n")
    print("| part | this checkout (s) | " + args.revision + " (s) | time ratio (this / revision) |")
    print("|---|---:|---:|---:|")
    for part, times in (("encoder forward", encoder), ("feature extraction", features)):
        new, old_time = statistics.median(times["this checkout"]), statistics.median(times[args.revision])
        print(f"| {part} | {new:.3f} | {old_time:.3f} | {new / old_time:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
