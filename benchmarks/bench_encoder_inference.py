"""Encoder inference on 10-second clips, batch 8, float32, 2 threads: CAT-base against transformers' ASTModel base.

Both models are randomly initialised (speed does not depend on the weights) and see the same (8, 1024, 128)
log-mel batch. AST cuts it into 1212 overlapping patches (+2 tokens = 1214), CAT into 512 patches (+CLS = 513).
Reference numbers measured with the authors' fairseq code on this machine kind: CAT-base 0.76-0.88 clips/s,
AST 0.43 clips/s.

    python benchmarks/bench_encoder_inference.py [--batch 8] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import ASTConfig, ASTModel

from cat_hf import CATConfig, CATModel


def seconds_per_batch(model: torch.nn.Module, inputs: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(inputs)  # warm-up (oneDNN primitive creation, allocator)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = torch.randn(args.batch, 1024, 128)

    contenders = {
        "CAT-base (cat_hf, multi-resolution stem, 513 tokens)": CATModel(CATConfig.from_preset("cat-base")),
        "AST base (transformers ASTModel, 1214 tokens)": ASTModel(ASTConfig()),
    }
    rows = []
    for name, model in contenders.items():
        model.eval()
        seconds = seconds_per_batch(model, inputs, args.repeats)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rows.append((name, params, seconds, args.batch / seconds))
        del model

    print(f"\nEncoder inference, batch {args.batch} x 10.24 s clips, fp32, {args.threads} threads, median of "
          f"{args.repeats}\n")
    print("| model | params (M) | s / batch | clips / s |")
    print("|---|---:|---:|---:|")
    for name, params, seconds, rate in rows:
        print(f"| {name} | {params:.1f} | {seconds:.2f} | {rate:.2f} |")
    print("| authors' fairseq CAT-base (reference, same machine kind) | 88.8 | - | 0.76-0.88 |")
    print("| AST measured alongside the authors' code (reference) | 86.2 | - | 0.43 |")
    ratio = rows[0][3] / rows[1][3]
    print(f"\nCAT-base / AST throughput ratio, same run: {ratio:.2f}x (target >= 1.8x)")


if __name__ == "__main__":
    main()
