"""What both training loops do the same way, beside their configs (`training_config`), run folders
(`checkpoints`) and optimisers (`optimization`): the Accelerator, the data order, the features of a batch, the
random draws of a step, stopping on a signal, and the facts a training summary records.

Reproducible and resumable by construction: the data order of an epoch depends only on (seed, epoch)
(`EpochSampler`), crops on (seed, epoch, clip) (`cat_hf.data`), and every random draw of a step on (seed, step,
micro-batch, process) (`derive_seed`); a resumed run skips the batches its checkpoint says were used
(`iterate_batches`), so it continues exactly where the uninterrupted run would be.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .checkpoints import TrainState
from .training_config import RecipeConfig

logger = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """One well-mixed 63-bit seed from several integers (seed, step, micro-batch, process, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64).dot(np.array([1 << 31, 1], dtype=np.uint64)))


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch seeded by (seed, epoch), or with `weights` `num_samples` draws with replacement
    (class-balanced sampling): the order depends on nothing else, so a run resumed at epoch e, batch b sees exactly
    the batches an uninterrupted run saw."""

    def __init__(self, length: int, seed: int, weights: torch.Tensor | None = None, num_samples: int | None = None):
        self.length = length
        self.seed = seed
        self.weights = weights
        self.num_samples = num_samples or length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length if self.weights is None else self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A3))
        if self.weights is None:
            return iter(torch.randperm(self.length, generator=generator).tolist())
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator).tolist())


def iterate_batches(accelerator: Any, dataloader: DataLoader, sampler: EpochSampler | None, dataset: Any,
                    state: TrainState, no_usable_batch: Callable[[], Exception]) -> Iterator[dict]:
    """Endless usable batches (a batch of only unreadable clips is `None` and passed over), epoch after epoch,
    starting where `state` says. `state.epoch` / `state.batches_in_epoch` follow the batches handed out, so a
    checkpoint taken between steps records exactly how far the data has gone. A whole epoch without a usable
    batch raises `no_usable_batch()`."""
    while True:
        # The order (sampler) and the crops (dataset) of an epoch depend only on (seed, epoch).
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(state.epoch)
        if sampler is not None:
            sampler.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        started_at, usable = state.batches_in_epoch, 0
        loader = accelerator.skip_first_batches(dataloader, started_at) if started_at else dataloader
        for batch in loader:
            state.batches_in_epoch += 1
            if batch is not None:
                usable += 1
                yield batch
        if started_at == 0 and usable == 0:
            raise no_usable_batch()
        state.epoch += 1
        state.batches_in_epoch = 0


def samples_for_frames(frames: int, sampling_rate: int = 16000, frame_length_ms: float = 25.0,
                       frame_shift_ms: float = 10.0) -> int:
    """Samples whose Kaldi fbank (no centre padding) has exactly `frames` frames: one window, then a shift each."""
    window = int(sampling_rate * frame_length_ms / 1000)
    shift = int(sampling_rate * frame_shift_ms / 1000)
    return window + (frames - 1) * shift


def featurize(feature_extractor: Any, waveforms: torch.Tensor, lengths: torch.Tensor, device: torch.device,
              padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N) zero-padded waveforms -> (normalised log-mel (B, T, 128) on `device`, attention mask (B, T) or None).
    Each clip is cut to its real length first. "max_length": every clip padded to the extractor's max_length
    frames in the filter-bank domain, as the original pipeline pads short clips, without a mask; "longest": the
    batch padded to its longest clip (whole patches, at most max_length frames) with the mask of the real frames."""
    window = int(feature_extractor.sampling_rate * feature_extractor.frame_length_ms / 1000)
    clips = [wave[: max(int(n), window)] for wave, n in zip(waveforms.float().cpu(), lengths.tolist())]
    masked = padding == "longest"
    inputs = feature_extractor(clips, sampling_rate=feature_extractor.sampling_rate, padding=padding,
                               truncation=True if masked else None, return_attention_mask=masked,
                               return_tensors="pt", device=device)  # fmt: skip
    return inputs["input_values"], inputs.get("attention_mask")


class StopSignals:
    """SIGTERM / SIGINT set a flag instead of killing the run: the loop finishes its step, saves a checkpoint and
    exits cleanly. A second Ctrl-C aborts at once. Handlers are only installed from the main thread."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving a checkpoint after this step, then stopping "
              "(Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Any) -> str | None:
        """The signal this process received, or "signal" when only another process did (all processes stop
        together); one collective."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        anywhere = accelerator.reduce(flag, reduction="sum").item() > 0
        return self.received or ("signal" if anywhere else None)


def exit_code(stopped_by: str | None) -> int:
    """0, or the shell's convention for a job a signal stopped (its state saved): 128 + the signal's number."""
    if not stopped_by:
        return 0
    return 128 + signal.Signals[stopped_by] if stopped_by in signal.Signals.__members__ else 1


def make_accelerator(*, mixed_precision: str, gradient_accumulation_steps: int, project_dir: Path,
                     logging_dir: Path | None = None, log_with: Any = None) -> Any:
    """The Accelerator of a run. The loops step their schedule once per optimiser update themselves and take their
    micro-batches from an endless iterator (`iterate_batches`), so accumulation does not follow the data loader.
    Checkpoints are written by `checkpoints.Checkpoints` (atomic, with manifests), so `ProjectConfiguration` names
    the folders only."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, ProjectConfiguration

    # Several processes but no GPU (`torchrun --nproc_per_node 2 -m cat_hf.pretrain ...`): Accelerate only joins
    # them into one gloo data-parallel run when told to use the CPU.
    cpu_data_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    warn_missing_trackers(log_with)
    return Accelerator(
        cpu=cpu_data_parallel,
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        # The only buffers are the fixed sin-cos position tables, identical on every process: broadcasting them
        # before every forward would only cost bandwidth.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(logging_dir or project_dir)),
    )


def warn_missing_trackers(log_with: Any) -> None:
    """Accelerate leaves out a requested tracker that is not installed without a word: say so (the run goes on,
    logging to metrics.jsonl)."""
    from accelerate.tracking import get_available_trackers

    requested = [log_with] if isinstance(log_with, str) else list(log_with or [])
    available = {getattr(tracker, "value", str(tracker)) for tracker in get_available_trackers()}
    missing = [name for name in requested if isinstance(name, str) and name != "all" and name not in available]
    if missing:
        logger.warning("Tracker(s) %s requested but not installed: this run logs to metrics.jsonl only (TensorBoard: "
                       "pip install \"cat-hf[train]\"; or set report_to to none).", missing)


def release_accelerator(accelerator: Any) -> None:
    """End the trackers and the process group, and let a later run in the same Python process build a fresh
    Accelerator (tests, notebooks, the demo)."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    GradientState._reset_state()
    if not torch.distributed.is_initialized():
        AcceleratorState._reset_state()


def load_checkpoint(accelerator: Any, folder: Path) -> None:
    """`accelerator.load_state`, with a message naming the likely cause when the saved optimiser does not fit."""
    try:
        accelerator.load_state(str(folder))
    except ValueError as error:
        if "parameter group" not in str(error):
            raise
        raise ValueError(
            f"--resume: the optimiser state in {folder} does not fit this run's parameter groups ({error}); it was "
            "written by another cat-hf version (before the CLS token was weight-decayed in pretraining) or with "
            "other lora / linear_probe settings. Resume it with that version, or start a new run."
        ) from error


def tracker_config(config: RecipeConfig) -> dict[str, Any]:
    """Scalar settings for the trackers' hyper-parameter views (`model.*` keys of mapping fields flattened)."""
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            flat[key] = value
        elif value is not None:
            flat[key] = str(value)
    return flat


def describe_hardware(accelerator: Any) -> str:
    """"1 x CPU (x86_64, 2 cores), torch 2.13.0" / "4 x NVIDIA H100 ...": the compute line of summaries and cards."""
    device = accelerator.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type.upper()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{accelerator.num_processes} x {name}, torch {torch.__version__}"


def library_versions() -> dict[str, str]:
    import accelerate
    import transformers

    from . import __version__

    versions = {"cat_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__}
    try:
        import peft

        versions["peft"] = peft.__version__
    except ImportError:
        pass
    return versions


__all__ = [
    "EpochSampler",
    "StopSignals",
    "derive_seed",
    "describe_hardware",
    "exit_code",
    "featurize",
    "iterate_batches",
    "library_versions",
    "load_checkpoint",
    "make_accelerator",
    "release_accelerator",
    "samples_for_frames",
    "tracker_config",
]
