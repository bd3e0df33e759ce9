"""Cost of the embedding API: clip and frame embeddings of 10-second clips against the same model's plain forward.

The peer is what a user writes without `cat_hf.embeddings`: the feature extractor on the batch (a list of 1-D
arrays, padding="longest", which returns the frame mask) and `model(**inputs)`. The API adds reading a (B, T)
tensor, the per-clip mean it subtracts itself (so that chunked fbanks equal the whole clip's), the half patch of
padding frames of the frame grid, the pass plan and the token reshaping. All contenders run on the same randomly
initialised model (speed does not depend on the weights) and the same batch of noise, in the same process, one
after the other in every round (each round in another order), so that load from other processes hits them alike;
the table gives the median of the rounds, and the ratio to the plain forward is taken round by round. The last
column is the time spent outside `model.forward` (features, padding, pooling, reshaping), which load from other
processes disturbs much less than the whole.

    python benchmarks/bench_embeddings.py [--preset cat-base] [--batch 8] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from cat_hf import CATConfig, CATFeatureExtractor, CATModel
from cat_hf.embeddings import CATEmbedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cat-base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CATModel(CATConfig.from_preset(args.preset)).eval()
    extractor = CATFeatureExtractor()
    rate = extractor.sampling_rate
    audio = torch.from_numpy(
        (0.1 * np.random.default_rng(0).standard_normal((args.batch, int(args.seconds * rate)))).astype(np.float32)
    )
    embedder = CATEmbedder(model, extractor, batch_size=args.batch)

    def plain() -> torch.Tensor:
        inputs = extractor(list(audio.numpy()), sampling_rate=rate, padding="longest", return_tensors="pt")
        with torch.inference_mode():
            return model(**inputs).last_hidden_state

    # Time inside model.forward, so that the work around it (the part the API adds to) is measured on its own too.
    inside: list[float] = []
    model.register_forward_pre_hook(lambda module, args: inside.append(-time.perf_counter()))
    model.register_forward_hook(lambda module, args, output: inside.append(time.perf_counter()))

    contenders = {
        "plain forward: extractor(list, padding='longest') + model(**inputs)": plain,
        "CATEmbedder.clip_embeddings((B, T) tensor)": lambda: embedder.clip_embeddings(audio, rate),
        "CATEmbedder.frame_embeddings((B, T) tensor), 160 ms": lambda: embedder.frame_embeddings(audio, rate),
    }
    for run in contenders.values():  # warm-up: oneDNN primitives, allocator, extractor buffers
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    outside: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_index in range(args.rounds):
        # each round starts with another contender, so that none always runs right after the same one
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            inside.clear()
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
            outside[name].append(times[name][-1] - sum(inside))

    baseline = times[next(iter(contenders))]
    frames = embedder.num_frame_embeddings(audio.shape[1])
    print(f"\n{args.preset}, batch {args.batch} x {args.seconds:g} s clips ({frames} frame embeddings each), fp32, "
          f"{args.threads} threads, {torch.__version__}; median of {args.rounds} rounds\n")
    print("| method | s / batch | clips / s | time vs plain forward (median of per-round ratios) "
          "| s / batch outside model.forward |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        seconds = statistics.median(values)
        ratio = statistics.median(v / b for v, b in zip(values, baseline))
        print(f"| {name} | {seconds:.3f} | {args.batch / seconds:.2f} | {ratio:.3f} | "
              f"{statistics.median(outside[name]):.4f} |")


if __name__ == "__main__":
    main()
