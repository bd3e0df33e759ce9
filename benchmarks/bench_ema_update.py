"""The EMA teacher update of pretraining: `cat_hf.optimization.ema_update` (one fused `torch._foreach_lerp_` over
the trainable tensors, one `torch._foreach_copy_` over the frozen ones and the buffers) against the per-tensor Python
loop of `CATForPreTraining.update_teacher`, on the same model, interleaved call by call (the machine is shared:
compare the ratio of one run only). Prints a table of median milliseconds per update over `--repeats` calls.

    python benchmarks/bench_ema_update.py --preset cat-base --repeats 25 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cat_hf import CATConfig, CATForPreTraining
from cat_hf.optimization import ema_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cat-base")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = CATForPreTraining(CATConfig.from_preset(args.preset, rr_embedding_dim=512)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    variants = {
        "per-tensor loop (update_teacher)": lambda step: model.update_teacher(step),
        "fused (optimization.ema_update)": lambda step: ema_update(model.teacher, model.cat, model.teacher_decay(step)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(1, args.repeats + 2):
        for name, update in variants.items():
            sync()
            start = time.perf_counter()
            update(step)
            sync()
            if step > 1:  # the first call of each warms up the allocator
                times[name].append(time.perf_counter() - start)
    tensors = sum(1 for _ in model.teacher.parameters()) + sum(1 for _ in model.teacher.buffers())
    print(f"EMA update of {args.preset} ({tensors} teacher tensors) on {device}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| variant | ms per update | vs loop |\n|---|---|---|")
    loop = statistics.median(times["per-tensor loop (update_teacher)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1e3 * median:.2f} | {loop / median:.2f}x |")


if __name__ == "__main__":
    main()
