"""`cat-hf demo`: the whole CAT workflow in a few minutes on a CPU, with no network and no data to download.

1. Synthesise a small labelled corpus in numpy (five sound classes, random parameters and background noise per
   clip), written as 16 kHz wav files in an audiofolder layout with fixed train/test splits.
2. Pretrain `cat-tiny` on the training clips: EMA teacher, inverse block masks, multi-resolution stem, and
   Representation Regularization toward a frozen external encoder. No pretrained network can be downloaded here,
   so the external encoder is a fixed, hand-crafted one (per-band log-mel mean and standard deviation): it stands
   in for CLAP/BEATs through the same "Python callable" interface a user plugs a real one into.
3. LoRA-finetune the pretrained encoder on the clips' tags (adapters on q_proj/v_proj, the head trained fully),
   merge the adapter.
4. Evaluate on the held-out test clips.
5. Classify a few clips with `pipeline("audio-classification")` from the saved folder.

Measured on 2 CPU cores (quiet machine): about 4 minutes in all, held-out accuracy 0.84 (chance 0.20; 0.84-0.96
over seeds 0-2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLING_RATE = 16000
CLASSES = ("hum", "rumble", "beeps", "whistle", "hiss")
#: What the demo writes inside its workdir (and removes again when it is run a second time there).
DEMO_FOLDERS = ("corpus", "cat-tiny-pretrained", "cat-tiny-lora", "evaluation")


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
# 2. The frozen external encoder of the demo's Representation Regularization
# ----------------------------------------------------------------------------------------------------------------

SPECTRAL_BANDS = 64
SPECTRAL_EMBEDDING_DIM = 2 * SPECTRAL_BANDS


def spectral_statistics(waveforms) -> torch.Tensor:
    """Per-band mean and standard deviation of a 64-band log-mel spectrogram: (B, 128), frozen, no parameters.

    A stand-in for a pretrained audio encoder in a sandbox without downloads (`python:cat_hf.demo:
    spectral_statistics?embedding_dim=128` as an RR encoder spec); real runs use CLAP, BEATs, AST, ...
    """
    from .feature_extraction_cat import kaldi_fbank_batch

    clips = [torch.as_tensor(np.asarray(w, dtype=np.float32)) for w in waveforms]
    lengths = [len(c) for c in clips]
    padded = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    mels, frames = kaldi_fbank_batch(padded, lengths, num_mel_bins=SPECTRAL_BANDS)
    embeddings = []
    for mel, count in zip(mels, frames.tolist()):
        mel = mel[:count]
        embeddings.append(torch.cat([mel.mean(0), mel.std(0)]) / 10.0)
    return torch.stack(embeddings)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run_demo(workdir: Path, *, pretrain_steps: int = 1000, finetune_steps: int = 400, clips_per_class: int = 40,
             seed: int = 0) -> dict:
    """Run every step in `workdir`; returns the timings and results it printed."""
    import transformers
    from transformers import pipeline

    from .evaluation import evaluate_model
    from .finetune import finetune
    from .pretrain import pretrain

    transformers.logging.set_verbosity_error()
    report: dict = {"steps": []}

    def step(name: str, start: float, result: str) -> None:
        seconds = time.perf_counter() - start
        report["steps"].append({"step": name, "seconds": round(seconds, 1), "result": result})
        print(f"[{seconds:6.1f} s] {name}: {result}", flush=True)

    corpus = workdir / "corpus"
    for owned in DEMO_FOLDERS:  # a rerun starts afresh instead of resuming or mixing with an older corpus
        shutil.rmtree(workdir / owned, ignore_errors=True)
    start = time.perf_counter()
    counts = synthesize_corpus(corpus, clips_per_class=clips_per_class, seed=seed)
    step("synthesise corpus", start,
         f"{len(CLASSES)} classes ({', '.join(CLASSES)}), {counts['train']} train / {counts['test']} test clips "
         f"of 2 s in {corpus}")

    start = time.perf_counter()
    pretrained = workdir / "cat-tiny-pretrained"
    pretrain({
        "model": {"preset": "cat-tiny", "rr_embedding_dim": SPECTRAL_EMBEDDING_DIM, "ema_decay": 0.99,
                  "ema_end_decay": 0.999, "ema_anneal_end_step": pretrain_steps},
        "data": str(corpus / "train"), "clip_seconds": 1.28, "target_length": None, "num_workers": 0,
        "rr_encoder": f"python:cat_hf.demo:spectral_statistics?embedding_dim={SPECTRAL_EMBEDDING_DIM}",
        "batch_size": 8, "max_steps": pretrain_steps, "learning_rate": 1e-3, "warmup_steps": pretrain_steps // 10,
        "mixed_precision": "no", "seed": seed, "output_dir": str(pretrained), "save_every": 0,
        "report_to": "none", "progress_bar": False, "log_every": 10,
    })
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r for r in records if "rr_loss" in r]
    step("pretrain cat-tiny with RR", start,
         f"{pretrain_steps} steps; loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f} "
         f"(RR {losses[0]['rr_loss']:.3f} -> {losses[-1]['rr_loss']:.3f}); exported to {pretrained}")

    start = time.perf_counter()
    finetuned = workdir / "cat-tiny-lora"
    result = finetune({
        "data": str(corpus / "train"), "model": str(pretrained), "preset": "cat-tiny", "max_length": 128,
        "feature_preset": "audioset", "validation_size": 0.2, "lora": True, "merge": True,
        "batch_size": 16, "max_steps": finetune_steps, "warmup_steps": finetune_steps // 10, "learning_rate": 3e-3,
        "eval_steps": max(finetune_steps // 4, 1), "num_workers": 0, "logging_steps": 1000, "seed": seed,
        "output_dir": str(finetuned), "drop_path_rate": 0.0,
    })
    merged = Path(result.get("merged_dir") or finetuned / "merged")
    step("LoRA finetune on the tags", start,
         f"{finetune_steps} steps, {100 * result['trainable_share']:.1f}% of the parameters trained, best validation "
         f"{result['metric']} {result['best_metric']:.3f}; adapter merged into {merged}")

    start = time.perf_counter()
    metrics = evaluate_model(str(merged), str(corpus / "test"), output_dir=str(workdir / "evaluation"))
    accuracy = metrics["metrics"]["accuracy"]
    report["accuracy"] = accuracy
    step("evaluate on held-out clips", start,
         f"accuracy {accuracy:.3f} on {metrics.get('num_examples')} clips (chance {1 / len(CLASSES):.2f})")

    start = time.perf_counter()
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


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder, removed at the end)")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--clips-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (the timings in the README use 2)")


def run_cli(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cat-hf-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        report = run_demo(workdir, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                          clips_per_class=args.clips_per_class, seed=args.seed)
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        print(f"\nDemo finished in {report['total_seconds']:.0f} s, held-out accuracy {report['accuracy']:.3f}.")
        if args.workdir:
            (workdir / "demo_report.json").write_text(json.dumps(report, indent=2))
            print(f"Model folder: {report['model_dir']}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
