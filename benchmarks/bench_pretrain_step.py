"""One pretraining step of CAT-base on 2 CPU threads: the multi-resolution stem against EAT's single-patch stem.

A step is what `cat_hf.pretrain` does per optimiser update: forward of CATForPreTraining (EMA teacher on the whole
clip, student on 4 masked clones per clip, CNN decoder, frame + utterance losses), backward, AdamW step and the EMA
teacher update; batch 2, 1024 frames (10.24 s), clone_batch 4, fp32, random weights and inputs (speed does not
depend on them). `stem_type="patch"` is EAT's stem (one 16x16 convolution, 12 blocks as in EAT-base).
Reference numbers measured with the authors' fairseq code on this machine kind: 18.7-19.4 s per step with CAT's
stem, 4.9 s with EAT's.

    python benchmarks/bench_pretrain_step.py [--batch 2] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cat_hf import CATConfig, CATForPreTraining
from cat_hf.pretrain import parameter_groups


def seconds_per_step(config: CATConfig, batch: int, frames: int, repeats: int) -> tuple[float, float]:
    """(median wall-clock seconds, median CPU seconds of this process) per step."""
    torch.manual_seed(0)
    model = CATForPreTraining(config).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=5e-4, betas=(0.9, 0.95))
    inputs = torch.randn(batch, frames, config.num_mel_bins)
    grid = (frames // config.patch_size, config.frequency_patches)
    times, cpu_times = [], []
    for step in range(repeats + 1):  # the first step warms up oneDNN primitives and the allocator
        generator = torch.Generator().manual_seed(step)
        start, cpu_start = time.perf_counter(), time.process_time()
        mask = model.make_mask(batch, grid, generator=generator)
        output = model(inputs, mask=mask, generator=generator)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(step + 1)
        if step:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), statistics.median(cpu_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--clone-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    common = dict(clone_batch=args.clone_batch, rr_embedding_dim=None)
    contenders = {
        "CAT-base, multi-resolution stem (cat_hf)": CATConfig.from_preset("cat-base", **common),
        "CAT-base with EAT's stem, stem_type=\"patch\", 12 blocks (cat_hf)": CATConfig.from_preset(
            "cat-base", stem_type="patch", num_hidden_layers=12, **common
        ),
    }
    measured = {name: seconds_per_step(config, args.batch, args.frames, args.repeats)
                for name, config in contenders.items()}

    (cat, _), (eat, _) = measured.values()
    print(f"\nOne pretraining step (forward + backward + AdamW + EMA update), batch {args.batch}, "
          f"{args.frames} frames, clone_batch {args.clone_batch}, fp32, {args.threads} threads, "
          f"median of {args.repeats}:\n")
    print("| model | s / step (wall) | CPU s / step | wall ratio to EAT's stem |")
    print("|---|---|---|---|")
    for name, (seconds, cpu_seconds) in measured.items():
        print(f"| {name} | {seconds:.2f} | {cpu_seconds:.2f} | {seconds / eat:.2f} |")
    print("| authors' fairseq CAT (reference, same machine kind) | 18.7-19.4 | - | 3.8-4.0 |")
    print("| authors' fairseq CAT with EAT's stem (reference) | 4.9 | - | 1.00 |")
    print(f"\nauthors' CAT step / cat_hf CAT step: {18.7 / cat:.2f}-{19.4 / cat:.2f} (above 1: cat_hf is faster). "
          "Wall times grow when other processes share the CPU; the CPU column is less sensitive to that.")


if __name__ == "__main__":
    main()
