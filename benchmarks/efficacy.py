"""Does training with cat-hf make good encoders? One table per corpus, every result beside its baselines.

    python benchmarks/efficacy.py run --root /work/corpora --output-dir runs/efficacy [--time-budget 3000]
    python benchmarks/efficacy.py report --output-dir runs/efficacy

For each labelled corpus (`<root>/<name>/{train,validation,test}.csv`, as `benchmarks/corpora.py` builds them, or
any folder with such CSVs: `--corpus NAME=FOLDER`), on the same fixed splits:

- **log-mel baseline**: a logistic regression on each clip's log-mel mean and standard deviation
  (`cat_hf.probe.log_mel_statistics`);
- **linear probes** of frozen encoders, CLS token and mean of the real patch tokens (`cat_hf.embeddings`), each a
  logistic regression whose L2 penalty is chosen on the validation split (`cat_hf.probe.fit_probe`), scored on test:
  - `init`: the randomly initialised cat-tiny every pretraining run starts from (seed 1);
  - `tiny`: `cat-hf pretrain --config tiny` with its defaults, no RR;
  - `rr-NAME`: the same with `--rr-encoder NAME` for each shipped teacher (`cat_hf.teachers`), and each teacher's
    own embedding probed the same way (`teacher-NAME`), to show what RR could transfer;
- **effective rank** (`cat_hf.probe.effective_rank`) of every encoder's clip embeddings on the corpus;
- **finetuning**: `cat-hf finetune --config tiny`, full and LoRA, from `init` and from the best pretrained encoder
  (the `rr-*` run with the best validation probe on that corpus), at equal steps; test scores from
  `eval_results.json`, with the log-mel baseline that finetune fits on the same split.

Pretraining uses one unlabelled corpus of about a thousand clips: `--pretrain-clips` clips drawn evenly from the
training splits of the corpora (seeded), as a user pretrains on their own data. Every piece of work is one command
(`cat-hf pretrain`, `cat-hf finetune`, or a probe in this process) whose result is cached under `--output-dir`; a
call runs pieces until `--time-budget` seconds are spent, and the next call continues. Commands, seeds, wall and
CPU seconds are recorded beside each result; `report` writes `report.md` and `summary.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cat_hf.audio import DEFAULT_SAMPLING_RATE, load_audio
from cat_hf.probe import effective_rank, fit_probe, log_mel_statistics
from cat_hf.teachers import TEACHERS

SPLITS = ("train", "validation", "test")
DEFAULT_CORPORA = ("spoken-language", "instruments", "drums", "speech-commands")
POOLINGS = ("cls", "mean")
SEED = 1  # the tiny recipe's seed: `init` is exactly the student every pretraining run starts from
#: Clip embeddings for probes: whole clips, in passes of at most this long (longer clips: the mean of the passes).
PROBE_CHUNK_SECONDS = 10.24


class NotReady(Exception):
    """A piece of work waits for another (a probe for its pretraining run, finetuning for the probes)."""


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=1, default=str), encoding="utf-8")
    os.replace(partial, path)


def run_command(command: list[str], log: Path, threads: int) -> dict[str, Any]:
    """Run a cat-hf command with `threads` torch threads; its wall and CPU seconds (children's user + system)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as stream:
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=False).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise RuntimeError(f"command failed ({code}); see {log}:\n  {shlex.join(command)}")
    return {"command": shlex.join(command), "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


# ================================================================================================================
# corpora


class Corpus:
    """A labelled corpus with fixed train / validation / test CSVs (path,label,...; paths relative to the CSV)."""

    def __init__(self, name: str, folder: Path):
        self.name, self.folder = name, folder
        self.rows = {}
        for split in SPLITS:
            path = folder / f"{split}.csv"
            if not path.is_file():
                raise SystemExit(f"{path} is missing: build the corpus (python benchmarks/corpora.py build {name} "
                                 f"--root {folder.parent}) or pass --corpus NAME=FOLDER with train/validation/test CSVs.")
            with open(path, encoding="utf-8", newline="") as stream:
                self.rows[split] = list(csv.DictReader(stream))
        self.classes = sorted({row["label"] for rows in self.rows.values() for row in rows})
        self._waves: dict[str, list[np.ndarray]] | None = None

    def csv(self, split: str) -> Path:
        return self.folder / f"{split}.csv"

    def labels(self, split: str) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.classes)}
        return np.array([index[row["label"]] for row in self.rows[split]])

    def waves(self, split: str) -> list[np.ndarray]:
        if self._waves is None:
            self._waves = {s: [load_audio(str(self.folder / row["path"]), DEFAULT_SAMPLING_RATE)
                               for row in self.rows[s]] for s in SPLITS}
        return self._waves[split]


def write_pretraining_mix(corpora: Sequence[Corpus], clips: int, path: Path) -> Path:
    """About `clips` training clips drawn evenly from the corpora (seeded), as one unlabelled CSV of absolute paths."""
    if path.is_file():
        return path
    per_corpus = -(-clips // len(corpora))
    chosen = []
    for corpus in corpora:
        rows = list(corpus.rows["train"])
        random.Random(f"{SEED}-{corpus.name}").shuffle(rows)
        chosen += [str((corpus.folder / row["path"]).resolve()) for row in rows[:per_corpus]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("path\n" + "".join(f"{p}\n" for p in sorted(chosen)), encoding="utf-8")
    return path


# ================================================================================================================
# encoders


def encoder_runs(args: argparse.Namespace) -> dict[str, list[str]]:
    """Pretraining runs: name -> extra `cat-hf pretrain` arguments. `tiny` is the packaged recipe as it is; `no-rr`
    the same without Representation Regularization (when the recipe has it); `rr-NAME` the recipe with each shipped
    teacher (the recipe's own teacher is `tiny`)."""
    from cat_hf.pretrain import PretrainConfig

    default = PretrainConfig.from_yaml("tiny")
    runs = {"tiny": []}
    if default.uses_rr:
        runs["no-rr"] = ["--rr-encoder", "none"]
    for teacher in args.teachers:
        if teacher != default.rr_encoder:
            runs[f"rr-{teacher}"] = ["--rr-encoder", teacher]
    return runs


def pretrain(args: argparse.Namespace, name: str, extra: list[str], mix: Path) -> dict[str, Any]:
    folder = args.output_dir / "encoders" / name
    done = read_json(folder / "efficacy.json")
    if done:
        return done
    command = ["cat-hf", "pretrain", "--config", "tiny", "--data", str(mix), "--output-dir", str(folder),
               "--threads", str(args.threads), "--set", "progress_bar=false", "--resume", "auto", *extra,
               *(x for o in args.pretrain_set for x in ("--set", o))]
    record = run_command(command, args.output_dir / "logs" / f"pretrain-{name}.log", args.threads)
    summary = read_json(folder / "training_summary.json", {})
    record.update({k: summary.get(k) for k in ("steps", "final_loss", "final_effective_rank", "rr_encoder",
                                                "wall_time_s")})
    write_json(folder / "efficacy.json", record)
    return record


def export_init(args: argparse.Namespace) -> Path:
    """The step-0 student of the tiny recipe (`build_model` after `set_seed`, as `cat-hf pretrain` does)."""
    from accelerate.utils import set_seed

    from cat_hf.feature_extraction_cat import CATFeatureExtractor
    from cat_hf.pretrain import PretrainConfig, build_model

    folder = args.output_dir / "encoders" / "init"
    if not (folder / "config.json").is_file():
        config = PretrainConfig.from_yaml("tiny").with_overrides({"data": "unused", "model.rr_embedding_dim": None})
        set_seed(config.seed)
        model = build_model(config)
        model.cat.save_pretrained(folder)
        CATFeatureExtractor.from_preset(config.feature_preset, max_length=config.frames).save_pretrained(folder)
    return folder


# ================================================================================================================
# probes


@torch.inference_mode()
def encoder_features(folder: Path, corpus: Corpus) -> dict[str, dict[str, np.ndarray]]:
    """{pooling: {split: (N, D)}}: clip embeddings of whole clips (CLS, and the mean of the real patch tokens), both
    from one pass of the model."""
    from cat_hf.embeddings import CATEmbedder

    embedder = CATEmbedder.from_pretrained(folder, chunk_seconds=PROBE_CHUNK_SECONDS)
    out: dict[str, dict[str, np.ndarray]] = {pooling: {} for pooling in POOLINGS}
    for split in SPLITS:
        for pooling, embeddings in embedder.pooled_clip_embeddings(corpus.waves(split), DEFAULT_SAMPLING_RATE,
                                                                   POOLINGS).items():
            out[pooling][split] = embeddings.numpy()
    return out


@torch.inference_mode()
def teacher_features(name: str, corpus: Corpus) -> dict[str, np.ndarray]:
    from cat_hf.external_encoders import build_external_encoder

    teacher = build_external_encoder(name)
    return {split: torch.cat([teacher(corpus.waves(split)[i:i + 16]) for i in range(0, len(corpus.waves(split)), 16)])
            .numpy() for split in SPLITS}


def probe_entry(features: dict[str, np.ndarray], corpus: Corpus) -> dict[str, Any]:
    result = fit_probe(*((features[s], corpus.labels(s)) for s in SPLITS), num_classes=len(corpus.classes))
    return {"test": result.test, "validation": result.validation, "weight_decay": result.weight_decay,
            "effective_rank": effective_rank(np.concatenate([features[s] for s in SPLITS]))}


def probe(args: argparse.Namespace, corpus: Corpus, encoder: str) -> dict[str, Any]:
    """Probe results of one encoder (or `logmel`, or `teacher-NAME`) on one corpus, cached."""
    path = args.output_dir / "probes" / corpus.name / f"{encoder}.json"
    cached = read_json(path)
    if cached:
        return cached
    start, cpu = time.perf_counter(), time.process_time()
    if encoder == "logmel":
        entry = {"logmel": probe_entry({s: log_mel_statistics(corpus.waves(s)) for s in SPLITS}, corpus)}
    elif encoder.startswith("teacher-"):
        entry = {"teacher": probe_entry(teacher_features(encoder[len("teacher-"):], corpus), corpus)}
    else:
        folder = args.output_dir / "encoders" / encoder
        if encoder != "init" and not (folder / "efficacy.json").is_file():
            raise NotReady(f"pretraining run {encoder} has not finished")
        features = encoder_features(folder, corpus)
        entry = {pooling: probe_entry(features[pooling], corpus) for pooling in POOLINGS}
    entry.update(wall_s=round(time.perf_counter() - start, 1), cpu_s=round(time.process_time() - cpu, 1))
    write_json(path, entry)
    return entry


# ================================================================================================================
# finetuning


def finetune(args: argparse.Namespace, corpus: Corpus, mode: str, start: str, encoder: str) -> dict[str, Any]:
    folder = args.output_dir / "finetune" / corpus.name / f"{mode}-{start}"
    done = read_json(folder / "efficacy.json")
    if done:
        return done
    command = ["cat-hf", "finetune", "--config", "tiny", "--model", str(args.output_dir / "encoders" / encoder),
               "--data", str(corpus.csv("train")), "--validation-data", str(corpus.csv("validation")),
               "--test-data", str(corpus.csv("test")), "--output-dir", str(folder), "--threads", str(args.threads),
               "--overwrite-output-dir", *(["--lora"] if mode == "lora" else []), *args.finetune_flag]
    record = run_command(command, args.output_dir / "logs" / f"finetune-{corpus.name}-{mode}-{start}.log", args.threads)
    summary = read_json(folder / "training_summary.json", {})
    results = read_json(folder / "eval_results.json", {})
    record.update(encoder=encoder, test=results.get("metrics", {}).get("accuracy"), steps=summary.get("steps"),
                  best_step=summary.get("best_step"), baseline=(summary.get("baseline") or {}).get("score"))
    write_json(folder / "efficacy.json", record)
    return record


def best_pretrained(args: argparse.Namespace, corpus: Corpus) -> str:
    """The pretrained encoder with the best validation probe (either pooling) on this corpus."""
    scores = {}
    for name in encoder_runs(args):
        entry = read_json(args.output_dir / "probes" / corpus.name / f"{name}.json")
        if not entry:
            raise NotReady(f"the probe of {name} on {corpus.name} has not run")
        scores[name] = max(entry[p]["validation"] for p in POOLINGS)
    return max(scores, key=scores.get)


# ================================================================================================================
# the whole experiment


def run(args: argparse.Namespace) -> None:
    budget = Budget(args.time_budget)
    corpora = [Corpus(name, folder) for name, folder in args.corpora]
    mix = write_pretraining_mix(corpora, args.pretrain_clips, args.output_dir / "pretrain-mix.csv")
    export_init(args)
    work: list[tuple[str, Any]] = []  # the longest pieces first, so that side-by-side calls finish together
    for name, extra in encoder_runs(args).items():
        work.append((f"pretrain {name}", lambda n=name, e=extra: pretrain(args, n, e, mix)))
    for corpus in corpora:
        work.append((f"probe logmel {corpus.name}", lambda c=corpus: probe(args, c, "logmel")))
        work.append((f"probe init {corpus.name}", lambda c=corpus: probe(args, c, "init")))
        for teacher in args.teachers:
            work.append((f"probe teacher {teacher} {corpus.name}", lambda c=corpus, t=teacher: probe(args, c, f"teacher-{t}")))
    for name in encoder_runs(args):
        for corpus in corpora:
            work.append((f"probe {name} {corpus.name}", lambda c=corpus, n=name: probe(args, c, n)))
    for corpus in corpora:
        for mode in args.finetune_modes:
            work.append((f"finetune {mode} init {corpus.name}", lambda c=corpus, m=mode: finetune(args, c, m, "init", "init")))
            work.append((f"finetune {mode} pretrained {corpus.name}",
                         lambda c=corpus, m=mode: finetune(args, c, m, "pretrained", best_pretrained(args, c))))
    locks = args.output_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    for label, job in work:
        if budget.left() <= 0:
            print(f"time budget spent; run again to continue (next: {label})")
            return
        lock = locks / label.replace(" ", "_")
        try:  # several calls may run side by side (one thread each): each piece of work is taken by one of them
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock.read_text().strip() if lock.is_file() else ""
            if holder.isdigit() and Path(f"/proc/{holder}").exists():
                continue
            lock.unlink(missing_ok=True)  # left by a call that died: take it over
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
        try:
            start = time.perf_counter()
            job()
            print(f"{label}: {time.perf_counter() - start:.0f} s", flush=True)
        except NotReady as waiting:
            print(f"{label}: later ({waiting})", flush=True)
        finally:
            lock.unlink(missing_ok=True)
    print("all done (or the rest is running in another call); `report` writes the tables")


def report(args: argparse.Namespace) -> str:
    lines = ["# Efficacy of cat-hf training", ""]
    summary: dict[str, Any] = {}
    for name, folder in args.corpora:
        corpus = Corpus(name, folder)
        probes = {p.stem: read_json(p) for p in sorted((args.output_dir / "probes" / name).glob("*.json"))}
        tunes = {p.parent.name: read_json(p) for p in sorted((args.output_dir / "finetune" / name).glob("*/efficacy.json"))}
        summary[name] = {"probes": probes, "finetune": tunes}
        counts = {s: len(corpus.rows[s]) for s in SPLITS}
        lines += [f"## {name}", "", f"{len(corpus.classes)} classes (chance {1 / len(corpus.classes):.3f}); clips "
                  f"train / validation / test {counts['train']} / {counts['validation']} / {counts['test']}.", "",
                  "| encoder / method | test accuracy, CLS | test accuracy, mean | effective rank (mean) | cost |",
                  "|---|---|---|---|---|"]
        for key, entry in probes.items():
            if "logmel" in entry:
                lines.append(f"| log-mel statistics + logistic regression | {entry['logmel']['test']:.3f} | | "
                             f"{entry['logmel']['effective_rank']:.1f} | {entry['wall_s']} s |")
            elif "teacher" in entry:
                lines.append(f"| {key} (the frozen teacher itself) | {entry['teacher']['test']:.3f} | | "
                             f"{entry['teacher']['effective_rank']:.1f} | {entry['wall_s']} s |")
            else:
                trained = read_json(args.output_dir / "encoders" / key / "efficacy.json", {})
                cost = f"pretrain {trained.get('cpu_s')} CPU-s" if trained else "-"
                lines.append(f"| probe of `{key}` | {entry['cls']['test']:.3f} | {entry['mean']['test']:.3f} | "
                             f"{entry['mean']['effective_rank']:.1f} | {cost} |")
        for key, entry in tunes.items():
            lines.append(f"| finetune {key} (`{entry['encoder']}`, {entry['steps']} steps) | {entry['test']} | | | "
                         f"{entry['cpu_s']} CPU-s |")
        lines.append("")
    lines[2:2] = headline(args, summary) + [""]
    write_json(args.output_dir / "summary.json", summary)
    text = "\n".join(lines) + "\n"
    (args.output_dir / "report.md").write_text(text, encoding="utf-8")
    return text


def headline(args: argparse.Namespace, summary: dict[str, Any]) -> list[str]:
    """One row per corpus: test accuracy of the baseline, the probes (the better pooling on validation) and the
    finetuning runs, with the effective rank of each encoder's clip embeddings in brackets."""
    def probe_cell(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "-"
        if "logmel" in entry or "teacher" in entry:
            result = entry.get("logmel") or entry.get("teacher")
            return f"{result['test']:.3f}"
        pooling = max(POOLINGS, key=lambda p: entry[p]["validation"])
        return f"{entry[pooling]['test']:.3f} ({pooling}, r {entry[pooling]['effective_rank']:.1f})"

    names = list(encoder_runs(args))
    teachers = [f"teacher-{t}" for t in args.teachers]
    header = (["corpus", "log-mel + LR", "init probe"] + [f"`{n}` probe" for n in names] + teachers
              + [f"{m} {s}" for m in args.finetune_modes for s in ("init", "pretrained")])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary.items():
        probes, tunes = entry["probes"], entry["finetune"]
        cells = [name, probe_cell(probes.get("logmel")), probe_cell(probes.get("init"))]
        cells += [probe_cell(probes.get(n)) for n in names] + [probe_cell(probes.get(t)) for t in teachers]
        for mode in args.finetune_modes:
            for start in ("init", "pretrained"):
                tune = tunes.get(f"{mode}-{start}")
                cells.append(f"{tune['test']:.3f}" if tune and tune.get("test") is not None else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return ["Test accuracy (probe pooling chosen on validation; r = effective rank of its clip embeddings):", ""] + rows


def _corpus(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    return (name, Path(folder)) if sep else (name, Path())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--root", type=Path, default=Path("/work/corpora"), help="where benchmarks/corpora.py built them")
    parser.add_argument("--corpora", nargs="+", default=list(DEFAULT_CORPORA), help="corpus names under --root")
    parser.add_argument("--corpus", action="append", default=[], type=_corpus, metavar="NAME=FOLDER",
                        help="another corpus folder with train/validation/test CSVs (repeatable)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--teachers", nargs="*", default=sorted(TEACHERS), help="shipped RR teachers to pretrain with")
    parser.add_argument("--pretrain-clips", type=int, default=1000)
    parser.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set for every pretraining run (the defaults are the point: use for experiments)")
    parser.add_argument("--finetune-modes", nargs="*", default=["full", "lora"])
    parser.add_argument("--finetune-flag", action="append", default=[], metavar="FLAG",
                        help="extra cat-hf finetune flag for every finetuning run (smoke tests: --finetune-flag=--max-steps=4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-budget", type=float, default=float("inf"), help="seconds of work per call")
    args = parser.parse_args(argv)
    args.corpora = [(name, args.root / name) for name in args.corpora] + list(args.corpus)
    torch.set_num_threads(args.threads)
    if args.command == "run":
        run(args)
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
