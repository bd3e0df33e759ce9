"""`cat-hf demo`: the whole CAT workflow in a few minutes on a CPU, with no data to download.

1. Synthesise a small labelled corpus in numpy (five sound classes, random parameters and background noise per
   clip), written as 16 kHz wav files in an audiofolder layout with fixed train/test splits.
2. Pretrain `cat-tiny` on the training clips with the packaged `tiny` recipe: EMA teacher, inverse block masks,
   multi-resolution stem, and Representation Regularization toward the shipped frozen teachers (aisfx and
   Resemblyzer, `cat_hf.teachers`; their pinned weights are fetched from PyPI on first use, or read from installed
   copies). The effective rank of the encoder's clip embeddings is printed before and after.
3. LoRA-finetune the pretrained encoder on the clips' tags with the `tiny` finetuning recipe (adapters on
   q_proj/v_proj, the head trained fully), merge the adapter; the log-mel-statistics baseline on the same split is
   printed beside the result.
4. Evaluate on the held-out test clips.
5. Classify a few clips with `pipeline("audio-classification")` from the saved folder.


In a `--workdir`, the demo writes only its own folders (`DEMO_FOLDERS`) and `demo_report.json`, and records every
file it wrote in `.cat-hf-demo.json`. Run again there, it replaces what it recorded and refuses to start if one of its
folders holds anything else, so it never deletes a file it did not write. Stopped by Ctrl-C or SIGTERM, it says which
step was running and exits with 130 / 143; it has no resume: run it again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLING_RATE = 16000
CLASSES = ("hum", "rumble", "beeps", "whistle", "hiss")
#: What the demo writes inside its workdir (and replaces when it is run a second time there).
DEMO_FOLDERS = ("corpus", "cat-tiny-pretrained", "cat-tiny-lora", "evaluation")
REPORT_FILE = "demo_report.json"
#: Every file the demo wrote in its workdir (relative paths): a rerun removes these and nothing else.
MANIFEST_FILE = ".cat-hf-demo.json"


class DemoInterrupted(Exception):
    """A signal stopped the demo; `step` is the step that was running, `signal_name` SIGINT or SIGTERM."""

    def __init__(self, step: str, signal_name: str, done: list[str]):
        self.step, self.signal_name, self.done = step, signal_name, done
        super().__init__(f"stopped by {signal_name} during step '{step}'")


class WorkdirInUseError(ValueError):
    """The workdir holds files in the demo's folders that the demo did not write."""


# ----------------------------------------------------------------------------------------------------------------
# 1. A corpus synthesised in numpy
# ----------------------------------------------------------------------------------------------------------------


def _band_noise(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    frequencies = np.fft.rfftfreq(n, 1 / SAMPLING_RATE)
    spectrum[(frequencies < low) | (frequencies > high)] = 0
    return np.fft.irfft(spectrum, n)


def synthesize_clip(label: str, rng: np.random.Generator, seconds: float) -> np.ndarray:
    """One clip of a class, with random parameters, background noise and gain. The classes differ in frequency
    band and in tonal vs. noisy vs. pulsed structure, as everyday sound categories do."""
    n = int(seconds * SAMPLING_RATE)
    t = np.arange(n) / SAMPLING_RATE
    if label == "hum":  # low harmonic tone
        f0 = rng.uniform(80, 200)
        signal = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
    elif label == "rumble":  # low-frequency noise
        signal = _band_noise(rng, n, 20, rng.uniform(300, 600))
    elif label == "beeps":  # mid-frequency tone bursts
        f0, rate = rng.uniform(700, 1500), rng.uniform(3, 8)
        signal = np.sin(2 * np.pi * f0 * t) * (np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3)) > 0)
    elif label == "whistle":  # high tone with vibrato
        f0, rate, depth = rng.uniform(2500, 5000), rng.uniform(3, 7), rng.uniform(20, 80)
        signal = np.sin(2 * np.pi * f0 * t + depth / rate * np.sin(2 * np.pi * rate * t))
    elif label == "hiss":  # high-frequency noise
        signal = _band_noise(rng, n, rng.uniform(3000, 4500), 7900)
    else:
        raise ValueError(f"unknown demo class {label!r}; choose from {CLASSES}")
    signal = signal / (np.abs(signal).max() + 1e-9)
    background = rng.standard_normal(n) * 10 ** (-rng.uniform(20, 35) / 20)
    return (rng.uniform(0.3, 0.9) * (signal + background) / 1.1).astype(np.float32)


def synthesize_corpus(root: Path, *, clips_per_class: int = 40, test_fraction: float = 0.25, seconds: float = 2.0,
                      seed: int = 0) -> dict[str, int]:
    """Write `root/{train,test}/<class>/<n>.wav` (an audiofolder with split folders); returns clip counts."""
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "test": 0}
    test_per_class = max(1, round(clips_per_class * test_fraction))
    for label in CLASSES:
        for i in range(clips_per_class):
            split = "test" if i < test_per_class else "train"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"{label}-{i:03d}.wav", synthesize_clip(label, rng, seconds), SAMPLING_RATE,
                     subtype="PCM_16")
            counts[split] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------------
# The workdir: only what the demo wrote is ever replaced
# ----------------------------------------------------------------------------------------------------------------


def _files_under(path: Path, workdir: Path) -> set[str]:
    if path.is_symlink() or path.is_file():
        return {path.relative_to(workdir).as_posix()}
    if not path.is_dir():
        return set()
    return {p.relative_to(workdir).as_posix() for p in path.rglob("*") if p.is_symlink() or not p.is_dir()}


def _recorded_files(workdir: Path) -> set[str]:
    try:
        return set(json.loads((workdir / MANIFEST_FILE).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _record_files(workdir: Path) -> None:
    """List what the demo wrote (its folders are cleared or new when it starts, so all they hold is its own)."""
    from .files import atomic_write_json

    written = set().union(*(_files_under(workdir / name, workdir) for name in (*DEMO_FOLDERS, REPORT_FILE)))
    atomic_write_json(workdir / MANIFEST_FILE, {"files": sorted(written)})


def clear_previous_run(workdir: Path) -> None:
    """Remove what an earlier demo run wrote in `workdir`; refuse (before deleting anything) if the demo's folders
    hold a file it did not write."""
    recorded = _recorded_files(workdir)
    targets = [workdir / name for name in (*DEMO_FOLDERS, REPORT_FILE)]
    for target in targets:
        foreign = sorted(_files_under(target, workdir) - recorded)
        if foreign:
            raise WorkdirInUseError(
                f"{target} holds {len(foreign)} file(s) that the demo did not write (e.g. {foreign[:3]}); the demo "
                f"writes {', '.join(DEMO_FOLDERS)} and {REPORT_FILE} in its workdir and never deletes files it did "
                "not write. Move them away or choose another --workdir."
            )
    for target in targets:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run_demo(workdir: Path, *, pretrain_steps: int = 300, finetune_steps: int = 300, clips_per_class: int = 40,
             seed: int = 0) -> dict:
    """Run every step in `workdir`; returns the timings and results it printed.

    Raises WorkdirInUseError (before writing anything) when the demo's folders in `workdir` hold files it did not
    write, and DemoInterrupted when a signal stops it (SIGINT / Ctrl-C, or SIGTERM while pretraining)."""
    import transformers
    from transformers import pipeline

    from .evaluation import evaluate_model
    from .finetune import FinetuneConfig, finetune
    from .pretrain import PretrainConfig, pretrain

    transformers.logging.set_verbosity_error()
    report: dict = {"steps": []}
    running = ["setting up the workdir"]

    def begin(name: str) -> float:
        running[0] = name
        return time.perf_counter()

    def step(name: str, start: float, result: str) -> None:
        seconds = time.perf_counter() - start
        report["steps"].append({"step": name, "seconds": round(seconds, 1), "result": result})
        print(f"[{seconds:6.1f} s] {name}: {result}", flush=True)

    def interrupted(signal_name: str) -> DemoInterrupted:
        return DemoInterrupted(running[0], signal_name, [s["step"] for s in report["steps"]])

    workdir.mkdir(parents=True, exist_ok=True)
    clear_previous_run(workdir)  # a rerun starts afresh instead of resuming or mixing with an older corpus
    corpus = workdir / "corpus"
    try:
        start = begin("synthesise corpus")
        counts = synthesize_corpus(corpus, clips_per_class=clips_per_class, seed=seed)
        step("synthesise corpus", start,
             f"{len(CLASSES)} classes ({', '.join(CLASSES)}), {counts['train']} train / {counts['test']} test clips "
             f"of 2 s in {corpus}")

        start = begin("pretrain cat-tiny with RR")
        pretrained = workdir / "cat-tiny-pretrained"
        console = io.StringIO()  # pretrain's own messages advise `cat-hf pretrain --resume`, which the demo has not
        with contextlib.redirect_stdout(console):
            outcome = pretrain(PretrainConfig.from_yaml("tiny").with_overrides({
                "data": str(corpus / "train"), "output_dir": str(pretrained), "max_steps": pretrain_steps,
                "warmup_steps": pretrain_steps // 10, "seed": seed, "save_every": 0, "report_to": "none",
                "progress_bar": False, "log_every": 10, "monitor_every": max(1, pretrain_steps // 5),
            }))
        if outcome.get("interrupted"):  # pretrain saved a checkpoint and returned early
            raise interrupted(outcome["interrupted"])
        summary = json.loads((pretrained / "training_summary.json").read_text())
        step("pretrain cat-tiny with RR", start,
             f"{pretrain_steps} steps, RR toward {summary['rr_encoder']}; loss {summary['final_loss']:.3f} (RR "
             f"{summary['final_rr_loss']:.3f}); effective rank of the clip embeddings "
             f"{summary['initial_effective_rank_mean']:.1f} -> {summary['final_effective_rank_mean']:.1f} (a collapsed "
             f"encoder: about 1); exported to {pretrained}")
        report["effective_rank"] = summary["final_effective_rank_mean"]

        start = begin("LoRA finetune on the tags")
        finetuned = workdir / "cat-tiny-lora"
        result = finetune(FinetuneConfig.from_yaml(
            "tiny", data=str(corpus / "train"), model=str(pretrained), validation_size=0.2, lora=True, merge=True,
            max_steps=finetune_steps, warmup_steps=finetune_steps // 10, eval_steps=max(finetune_steps // 4, 1),
            logging_steps=1000, seed=seed, output_dir=str(finetuned),
        ))
        merged = Path(result.get("merged_dir") or finetuned / "merged")
        step("LoRA finetune on the tags", start,
             f"{finetune_steps} steps, {100 * result['trainable_share']:.1f}% of the parameters trained, best "
             f"validation {result['metric']} {result['best_metric']:.3f} (log-mel statistics baseline on the same "
             f"split: {result['baseline']['score']:.3f}); adapter merged into {merged}")

        start = begin("evaluate on held-out clips")
        metrics = evaluate_model(str(merged), str(corpus / "test"), output_dir=str(workdir / "evaluation"))
        accuracy = metrics["metrics"]["accuracy"]
        report["accuracy"] = accuracy
        step("evaluate on held-out clips", start,
             f"accuracy {accuracy:.3f} on {metrics.get('num_examples')} clips (chance {1 / len(CLASSES):.2f})")

        start = begin("pipeline('audio-classification') on new clips")
        classifier = pipeline("audio-classification", model=str(merged))
        rng = np.random.default_rng(seed + 1)
        lines = []
        for label in CLASSES:
            audio = synthesize_clip(label, rng, 2.0)
            top = classifier({"array": audio, "sampling_rate": SAMPLING_RATE}, top_k=1)[0]
            lines.append(f"{label} -> {top['label']} ({top['score']:.2f})")
        step("pipeline('audio-classification') on new clips", start, "; ".join(lines))
        report["model_dir"] = str(merged)
        return report
    except KeyboardInterrupt as stop:
        raise interrupted(stop.args[0] if stop.args and str(stop.args[0]).startswith("SIG") else "SIGINT") from None
    finally:
        _record_files(workdir)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder, removed at the end); "
                                          "the demo writes only its own folders there")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (the timings in the README use 2)")


def _terminate(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)  # unwinds like Ctrl-C, so the demo says where it stopped


def run_cli(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cat-hf-demo-"))
    start = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run_demo(workdir, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                          clips_per_class=args.clips_per_class, seed=args.seed)
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        print(f"\nDemo finished in {report['total_seconds']:.0f} s, held-out accuracy {report['accuracy']:.3f}.")
        if args.workdir:
            from .files import atomic_write_json

            atomic_write_json(workdir / REPORT_FILE, report)
            _record_files(workdir)
            print(f"Model folder: {report['model_dir']}")
        return 0
    except WorkdirInUseError as error:
        print(f"cat-hf demo: error: {error}", file=sys.stderr)
        return 2
    except DemoInterrupted as stop:
        done = f" after: {', '.join(stop.done)}" if stop.done else ""
        kept = (f"What it wrote so far is in {workdir}; running the demo again there replaces it."
                if args.workdir else "Its temporary folder was removed.")
        print(f"\ncat-hf demo: stopped by {stop.signal_name} during step '{stop.step}'{done}; the steps after it did "
              f"not run. The demo cannot be resumed: run it again to start afresh. {kept}", file=sys.stderr)
        known = stop.signal_name in signal.Signals.__members__
        return 128 + int(signal.Signals[stop.signal_name]) if known else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
