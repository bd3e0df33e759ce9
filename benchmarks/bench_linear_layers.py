"""CAT-base's linear layers on CPU: the package's oneDNN path against plain `F.linear` and the former `CATLinear`.

The transformer's projections are plain `nn.Linear` modules, so that dynamic int8 quantisation, PEFT and export
see linear layers. On CPU in float32, `modeling_cat.linear` computes such a layer as a oneDNN 1x1 convolution when
nothing can tell the difference (a plain module, no hooks, not traced or exported); the masked pretraining stem
applies its convolution weights to patch tiles the same way (`modeling_cat.pointwise`). Measured, in one run with
the variants interleaved call by call (the machine is shared: compare ratios of one run only):

- "package": as shipped;
- "plain F.linear": every linear product through `F.linear` (what tooling-visible `nn.Linear` costs without the
  oneDNN path);
- "CATLinear (before)": the former nn.Linear subclass whose forward ran the 1x1 convolution, which hid the layers
  from quantisation and export.

Encoder inference: CATModel, batch 8 x 1024 frames (10.24 s clips), fp32, beside transformers' AST base. Pretraining
step: forward + backward + AdamW + EMA update, batch 2, clone_batch 4, as bench_pretrain_step.py.

    python benchmarks/bench_linear_layers.py [--repeats 5] [--threads 2] [--skip-encoder] [--skip-pretraining]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ASTConfig, ASTModel

from cat_hf import CATConfig, CATForPreTraining, CATModel, modeling_cat
from cat_hf.pretrain import parameter_groups

AUTHORS_CLIPS_PER_SECOND = 0.8  # the authors' fairseq CAT-base, idle machine of this kind (0.76-0.88)
AUTHORS_SECONDS_PER_STEP = 18.7  # the authors' fairseq CAT pretraining step, idle machine of this kind (18.7-19.4)
VARIANTS = ("package", "plain F.linear", "CATLinear (before)")


class OneDNNLinear(nn.Linear):
    """The former CATLinear: same parameters, rows run as a 1x1 convolution over a channels-last view (oneDNN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.numel() < 64 * x.shape[-1] or torch.is_autocast_enabled("cpu"):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(1, -1, 1, x.shape[-1]).permute(0, 3, 1, 2)
        out = F.conv2d(rows, self.weight[:, :, None, None], self.bias)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


def with_onednn_linears(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` (in place) for a OneDNNLinear sharing its parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                swapped = OneDNNLinear(child.in_features, child.out_features, bias=child.bias is not None)
                swapped.weight, swapped.bias = child.weight, child.bias
                setattr(parent, name, swapped)
    return model


@contextlib.contextmanager
def plain_linear_products():
    """Every linear product of modeling_cat through F.linear while inside."""
    saved = modeling_cat.linear, modeling_cat.pointwise
    modeling_cat.linear = lambda module, x: module(x)
    modeling_cat.pointwise = lambda x, weight, bias: F.linear(x, weight.flatten(1) if weight.ndim == 4 else weight, bias)
    try:
        yield
    finally:
        modeling_cat.linear, modeling_cat.pointwise = saved


def interleaved_medians(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median CPU seconds of this process) per call of each runner, calling them in turn
    (one warm-up call each first). CPU seconds are less sensitive to other processes sharing the cores."""
    for run in runs.values():
        run()
    times = {name: ([], []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(time.process_time() - cpu_start)
    return {name: (statistics.median(wall), statistics.median(cpu)) for name, (wall, cpu) in times.items()}


def encoder_runner(model: nn.Module, inputs: torch.Tensor, plain: bool = False) -> Callable[[], None]:
    model.eval()

    def run():
        with torch.inference_mode(), plain_linear_products() if plain else contextlib.nullcontext():
            model(inputs)

    return run


def pretraining_runner(model: CATForPreTraining, optimizer: torch.optim.Optimizer, batch: int, frames: int,
                       plain: bool = False) -> Callable[[], None]:
    model.train()
    inputs = torch.randn(batch, frames, model.config.num_mel_bins)
    grid = (frames // model.config.patch_size, model.config.frequency_patches)
    state = {"step": 0}

    def run():
        with plain_linear_products() if plain else contextlib.nullcontext():
            generator = torch.Generator().manual_seed(state["step"])
            mask = model.make_mask(batch, grid, generator=generator)
            model(inputs, mask=mask, generator=generator).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            model.update_teacher(state["step"])

    return run


def encoder_table(repeats: int, threads: int) -> None:
    torch.manual_seed(0)
    inputs = torch.randn(8, 1024, 128)
    package = CATModel(CATConfig.from_preset("cat-base"))
    before = with_onednn_linears(CATModel(CATConfig.from_preset("cat-base")))
    before.load_state_dict(package.state_dict())
    runs = {
        f"CAT-base, {VARIANTS[0]}": encoder_runner(package, inputs),
        f"CAT-base, {VARIANTS[1]}": encoder_runner(package, inputs, plain=True),
        f"CAT-base, {VARIANTS[2]}": encoder_runner(before, inputs),
        "AST base (transformers ASTModel)": encoder_runner(ASTModel(ASTConfig()), inputs),
    }
    seconds = interleaved_medians(runs, repeats)
    print(f"\nEncoder inference, batch 8 x 1024 frames, fp32, {threads} threads, median of {repeats} "
          "(variants interleaved)\n")
    print("| encoder | s / batch (wall) | clips / s | CPU s / batch | vs AST base (wall) | vs AST base (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    ast_wall, ast_cpu = seconds["AST base (transformers ASTModel)"]
    for name, (wall, cpu) in seconds.items():
        print(f"| {name} | {wall:.2f} | {8 / wall:.2f} | {cpu:.2f} | {ast_wall / wall:.2f}x | {ast_cpu / cpu:.2f}x |")
    print(f"| authors' fairseq CAT-base (reference, idle machine of this kind) | - | {AUTHORS_CLIPS_PER_SECOND} "
          "| - | - | - |")
    (package_wall, package_cpu), (plain_wall, plain_cpu), (before_wall, before_cpu), _ = seconds.values()
    print(f"\nplain F.linear / package: wall {plain_wall / package_wall:.3f}, CPU {plain_cpu / package_cpu:.3f}; "
          f"CATLinear (before) / package: wall {before_wall / package_wall:.3f}, CPU {before_cpu / package_cpu:.3f}")


def pretraining_table(repeats: int, threads: int) -> None:
    config = CATConfig.from_preset("cat-base", clone_batch=4, rr_embedding_dim=None)
    torch.manual_seed(0)
    package, before = CATForPreTraining(config), CATForPreTraining(config)
    before.load_state_dict(package.state_dict())
    with_onednn_linears(before)
    optimizers = [torch.optim.AdamW(parameter_groups(m, 0.05), lr=5e-4, betas=(0.9, 0.95)) for m in (package, before)]
    runs = {
        VARIANTS[0]: pretraining_runner(package, optimizers[0], 2, 1024),
        # the package's model and optimiser again (speed does not depend on the weights)
        VARIANTS[1]: pretraining_runner(package, optimizers[0], 2, 1024, plain=True),
        VARIANTS[2]: pretraining_runner(before, optimizers[1], 2, 1024),
    }
    seconds = interleaved_medians(runs, repeats)
    print(f"\nPretraining step, CAT-base, batch 2 x 1024 frames, clone_batch 4, fp32, {threads} threads, median of "
          f"{repeats} (variants interleaved)\n")
    print("| linear products | s / step (wall) | CPU s / step | authors' 18.7 s / wall |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu) in seconds.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {AUTHORS_SECONDS_PER_STEP / wall:.2f}x |")
    (package_wall, _), (plain_wall, _), (before_wall, _) = seconds.values()
    print(f"\nplain F.linear / package: {plain_wall / package_wall:.3f}; CATLinear (before) / package: "
          f"{before_wall / package_wall:.3f} (wall). The authors' 18.7-19.4 s were measured on an idle machine.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-pretraining", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_encoder:
        encoder_table(args.repeats, args.threads)
    if not args.skip_pretraining:
        pretraining_table(args.repeats, args.threads)


if __name__ == "__main__":
    main()
