"""Finetuning: real runs on synthetic wav corpora (tones / noise / clicks) with a tiny random CAT, exported folders
served by the transformers pipeline, the optimiser rules, augmentations, recipes, and bad-input errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from synthetic_audio import CLASSES, SR, synth

import cat_hf  # noqa: F401 - registers CAT with the Auto classes (the pipeline needs it)
from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATModel
from cat_hf.augment import (
    AugmentationConfig,
    Augmenter,
    mixup,
    random_gain,
    random_roll,
    spec_augment,
)
from cat_hf.data import CorpusError
from cat_hf.finetune import (
    FinetuneConfig,
    FinetuneConfigError,
    balanced_sample_weights,
    build_param_groups,
    finetune,
    main,
    resolve_recipe,
    warmup_cosine,
)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def write_audiofolder(root: Path, per_class: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            sf.write(root / kind / f"{kind}{i}.wav", synth(kind, rng.uniform(0.5, 0.9), rng, gain=rng.uniform(0.5, 1.5)), SR)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_audiofolder(tmp_path_factory.mktemp("corpus") / "sounds")


def micro_config(**overrides) -> CATConfig:
    return CATConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, stem_channels=[16, 32],
                     stem_depths=[1, 1], rr_embedding_dim=None, **overrides)  # fmt: skip


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny CAT encoder folder (what `cat-hf pretrain` writes, minus the training)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder") / "cat-micro"
    CATModel(micro_config()).save_pretrained(folder)
    CATFeatureExtractor(max_length=64).save_pretrained(folder)
    return folder


def run_settings(data, encoder_dir: Path, output_dir: Path, **overrides) -> dict:
    settings = dict(data=str(data), model=str(encoder_dir), output_dir=str(output_dir), batch_size=8,
                    max_steps=6, warmup_steps=1, learning_rate=2e-3, eval_steps=3, logging_steps=3, num_workers=0,
                    validation_size=0.25, seed=0)  # fmt: skip
    settings.update(overrides)
    return settings


# ----------------------------------------------------------------------------------------------------------------
# End-to-end runs


def test_full_finetune_learns_and_exports_a_pipeline_folder(corpus, encoder_dir, tmp_path, capfd):
    out = tmp_path / "run"
    result = finetune(run_settings(corpus, encoder_dir, out, max_steps=60, warmup_steps=6, eval_steps=20))
    printed = capfd.readouterr()
    # One line on the new head instead of transformers' table of "missing" head weights.
    assert f"model: encoder from {encoder_dir}, new classification head for 3 labels (it has none)" in printed.out
    assert "LOAD REPORT" not in printed.err + printed.out

    # 12 held-out clips, 3 balanced classes: chance is 1/3.
    assert result["problem_type"] == "single_label_classification" and result["loss"] == "ce"
    assert result["best_metric"] > 0.6, result["history"]
    assert result["eval_results"]["accuracy"] > 0.6
    assert [h["step"] for h in result["history"]] == [20, 40, 60]

    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["labels"] == list(CLASSES) and summary["data"]["validation"]["num_clips"] == 12
    assert summary["layer_decay"] == 0.65 and summary["trainable_share"] == 1.0
    assert summary["epochs"] == round(60 * 8 / summary["data"]["train"]["num_clips"], 3)  # 480 clips seen / 36
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["metrics"]["accuracy"] == pytest.approx(result["eval_results"]["accuracy"])
    assert not (out / "checkpoint-best").exists()

    from transformers import pipeline

    classifier = pipeline("audio-classification", model=str(out))
    assert classifier.model.config.id2label == dict(enumerate(CLASSES))
    scores = classifier(synth("tone", 0.6, np.random.default_rng(7)), top_k=None)
    assert {s["label"] for s in scores} == set(CLASSES)
    assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)  # softmax for single-label


def write_multilabel_csv(folder: Path, seed: int = 1) -> Path:
    """Clips with the tags tone / noise / both, listed in a path,tags CSV with comma-separated tags."""
    rng = np.random.default_rng(seed)
    (folder / "clips").mkdir(parents=True)
    lines = ["path,tags"]
    for i in range(24):
        tags = [("tone",), ("noise",), ("tone", "noise")][i % 3]
        clip = sum(synth(tag, 0.7, rng) for tag in tags)
        sf.write(folder / "clips" / f"{i}.wav", clip, SR)
        lines.append(f'clips/{i}.wav,"{",".join(tags)}"')
    (folder / "tags.csv").write_text("\n".join(lines) + "\n")
    return folder / "tags.csv"


def test_multilabel_csv_gives_sigmoid_pipeline_scores(encoder_dir, tmp_path):
    tags_file = write_multilabel_csv(tmp_path / "data")
    out = tmp_path / "run"
    result = finetune(run_settings(tags_file, encoder_dir, out, mixup_alpha=0.8, balanced_sampling=True))
    assert result["problem_type"] == "multi_label_classification"
    assert result["loss"] == "bce" and result["metric"] == "mAP"
    assert 0.0 <= result["eval_results"]["mAP"] <= 1.0

    from transformers import (
        AutoFeatureExtractor,
        AutoModelForAudioClassification,
        pipeline,
    )

    model = AutoModelForAudioClassification.from_pretrained(out).eval()
    assert model.config.problem_type == "multi_label_classification"
    clip = sf.read(tmp_path / "data" / "clips" / "2.wav", dtype="float32")[0]
    extractor = AutoFeatureExtractor.from_pretrained(out)
    with torch.no_grad():
        logits = model(**extractor(clip, sampling_rate=SR, return_tensors="pt")).logits[0]
    expected = {model.config.id2label[i]: float(p) for i, p in enumerate(torch.sigmoid(logits))}

    scores = pipeline("audio-classification", model=str(out))(clip, top_k=None)
    got = {s["label"]: s["score"] for s in scores}
    assert got == pytest.approx(expected, abs=1e-5)  # the plain pipeline call applies sigmoid
    assert abs(sum(got.values()) - 1.0) > 1e-3


def test_linear_probe_trains_only_the_head(corpus, encoder_dir, tmp_path):
    out = tmp_path / "probe"
    result = finetune(run_settings(corpus, encoder_dir, out, linear_probe=True, max_steps=3, eval_steps=3))
    assert result["mode"] == "linear_probe" and result["layer_decay"] == 1.0
    assert result["trainable_parameters"] == 64 * 2 + 64 * 3 + 3  # fc_norm + classifier
    from safetensors.torch import load_file

    trained, initial = load_file(out / "model.safetensors"), load_file(encoder_dir / "model.safetensors")
    assert torch.equal(trained["cat.layers.0.attention.q_proj.weight"], initial["layers.0.attention.q_proj.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input fails before training, naming the rows


def assert_nothing_trained(out: Path) -> None:
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-best").exists()


def test_validation_labels_unknown_to_training_are_listed(corpus, encoder_dir, tmp_path):
    rng = np.random.default_rng(3)
    sf.write(tmp_path / "a.wav", synth("tone", 0.6, rng), SR)
    sf.write(tmp_path / "b.wav", synth("noise", 0.6, rng), SR)
    validation = tmp_path / "validation.csv"
    validation.write_text("path,tags\na.wav,tone\nb.wav,siren\n")
    out = tmp_path / "run"
    with pytest.raises(CorpusError) as info:
        finetune(run_settings(corpus, encoder_dir, out, validation_data=str(validation)))
    message = str(info.value)
    assert "row 1" in message and "b.wav" in message and "'siren'" in message and "row 0" not in message
    assert info.value.rows == [1]
    assert_nothing_trained(out)


def test_empty_class_folder_is_an_error(corpus, encoder_dir, tmp_path):
    data = tmp_path / "sounds"
    shutil.copytree(corpus, data)
    (data / "siren").mkdir()
    out = tmp_path / "run"
    with pytest.raises(CorpusError, match=r"hold no audio files: \['siren'\]"):
        finetune(run_settings(data, encoder_dir, out))
    assert_nothing_trained(out)


def test_a_single_class_is_an_error_before_training(corpus, encoder_dir, tmp_path):
    data = tmp_path / "sounds"
    shutil.copytree(corpus / CLASSES[0], data / CLASSES[0])
    out = tmp_path / "run"
    with pytest.raises(CorpusError, match=rf"a single class \({CLASSES[0]}\).*needs at least 2"):
        finetune(run_settings(data, encoder_dir, out))
    assert not out.exists()


def test_label_list_with_a_class_without_examples_is_an_error(corpus, encoder_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CorpusError, match=r"no example in the training split: \['siren'\]"):
        finetune(run_settings(corpus, encoder_dir, out, labels=[*CLASSES, "siren"]))
    assert_nothing_trained(out)


def test_tags_file_naming_missing_files_lists_them_via_the_cli(corpus, encoder_dir, tmp_path, capsys):
    tags = tmp_path / "tags.csv"
    existing = sorted((corpus / "tone").glob("*.wav"))[:3]
    rows = [f"{p},tone" for p in existing] + ["missing/gone.wav,noise", f"{existing[0]},tone", "nowhere.wav,clicks"]
    tags.write_text("path,tags\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    code = main(["--data", str(tags), "--model", str(encoder_dir), "--output-dir", str(out), "--num-workers", "0"])
    assert code == 2
    error = capsys.readouterr().err
    assert "2 row(s) name audio files that do not exist" in error
    assert "row 3:" in error and "gone.wav" in error and "row 5:" in error and "nowhere.wav" in error
    assert_nothing_trained(out)


def test_settings_errors_name_the_setting(tmp_path):
    with pytest.raises(FinetuneConfigError, match="Unknown finetuning setting"):
        FinetuneConfig.from_dict({"data": "x", "learning_rte": 1e-3})
    with pytest.raises(FinetuneConfigError, match="LoRA adapts a pretrained model"):
        FinetuneConfig(data="x", lora=True).validate()
    with pytest.raises(FinetuneConfigError, match="not both"):
        FinetuneConfig(data="x", model="m", lora=True, linear_probe=True).validate()
    with pytest.raises(FinetuneConfigError, match="No training data"):
        FinetuneConfig().validate()
    with pytest.raises(FinetuneConfigError, match=r"warmup_steps \(8\) must be .* below max_steps \(5\); lower --warmup"):
        FinetuneConfig(data="x", warmup_steps=8, max_steps=5).validate()
    with pytest.raises(FinetuneConfigError, match=r"model: no model folder at \./no-such-encoder"):
        FinetuneConfig(data="x", model="./no-such-encoder").validate()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FinetuneConfigError, match="overwrite_output_dir"):
        finetune({"data": "x", "output_dir": str(tmp_path / "out")})


# ----------------------------------------------------------------------------------------------------------------
# Optimiser, schedule, sampling


def test_layer_decay_follows_the_original_rule():
    model = CATForAudioClassification(micro_config(num_labels=3))
    groups = build_param_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.65, num_layers=2)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert scale["cat.layers.0.attention.q_proj.weight"] == pytest.approx(0.65**2)  # decay ** (L + 1 - (i + 1))
    assert scale["cat.layers.1.mlp.fc2.bias"] == pytest.approx(0.65)
    for name in ("cat.embeddings.cls_token", "cat.embeddings.stem.token_proj.weight", "cat.embeddings.context_norm.weight",
                 "fc_norm.weight", "classifier.weight"):  # fmt: skip
        assert scale[name] == 1.0, name
    assert decay["classifier.weight"] == 0.05 and decay["cat.embeddings.cls_token"] == 0.05
    assert decay["classifier.bias"] == 0.0 and decay["fc_norm.weight"] == 0.0 and decay["cat.layers.0.norm1.weight"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    beit = build_param_groups(model, learning_rate=1.0, weight_decay=0.05, layer_decay=0.65, num_layers=2, decay_stem=True)
    beit_scale = {name: g["lr_scale"] for g in beit for name in g["names"]}
    assert beit_scale["cat.embeddings.cls_token"] == pytest.approx(0.65**3) and beit_scale["classifier.weight"] == 1.0


def test_warmup_cosine_schedule():
    kwargs = dict(warmup_steps=10, max_steps=110, min_ratio=0.02)
    assert warmup_cosine(0, **kwargs) == pytest.approx(0.02)
    assert warmup_cosine(5, **kwargs) == pytest.approx(0.51)
    assert warmup_cosine(10, **kwargs) == pytest.approx(1.0)
    assert warmup_cosine(60, **kwargs) == pytest.approx(0.51)
    assert warmup_cosine(110, **kwargs) == pytest.approx(0.02)


def test_balanced_sampling_weights_are_inverse_label_frequency():
    weights = balanced_sample_weights([["a"], ["a"], ["a"], ["b"], ["a", "b"]])
    assert weights.tolist() == pytest.approx([0.25, 0.25, 0.25, 0.5, 0.75])


# ----------------------------------------------------------------------------------------------------------------
# Augmentations


def test_augmentations_are_seeded_and_shaped():
    waves = torch.randn(4, 8000)
    lengths = torch.tensor([8000, 6000, 8000, 500])
    waves[1, 6000:] = 0
    waves[3, 500:] = 0
    config = AugmentationConfig(mixup_alpha=0.8, freq_mask_ratio=0.2, time_mask_ratio=0.2, roll=True, gain=True, noise=True)
    features = torch.randn(4, 64, 128)
    targets = torch.eye(4)[:, :3].contiguous()
    runs = []
    for _ in range(2):
        augmenter = Augmenter(config, seed=5)
        mask = torch.ones(4, 64, dtype=torch.long)
        mask[3, 16:] = 0
        runs.append((augmenter.waveforms(waves, lengths), *augmenter.features(features, targets, mask)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert not torch.equal(runs[0][0], waves)

    rolled = random_roll(waves, lengths, torch.Generator().manual_seed(0))
    assert torch.all(rolled[1, 6000:] == 0)  # padding stays padding
    assert torch.allclose(rolled[1, :6000].sort().values, waves[1, :6000].sort().values)
    factors = random_gain(torch.ones(1000, 1), torch.Generator().manual_seed(0))
    assert 0.5 < factors.min() and factors.max() < 1.5 and float(factors.mean()) == pytest.approx(1.0, abs=0.02)

    mixed, mixed_targets, lam = mixup(features, targets, 0.8, 1.0, torch.Generator().manual_seed(1))
    assert 0 < lam < 1 and torch.allclose(mixed, lam * features + (1 - lam) * features.flip(0))
    assert torch.allclose(mixed_targets, lam * targets + (1 - lam) * targets.flip(0))

    masked = spec_augment(torch.ones(200, 100, 128), 0.2, 0.2, torch.Generator().manual_seed(2))
    zero_bins = (masked == 0).all(dim=1).sum(dim=1)  # frequency bins masked over all frames
    zero_frames = (masked == 0).all(dim=2).sum(dim=1)
    # widths are uniform in [0, ratio * size), cut at whole bins: at most ceil(ratio * size) (as torchaudio)
    assert zero_bins.max() <= math.ceil(0.2 * 128) and zero_frames.max() <= math.ceil(0.2 * 100)
    assert zero_bins.float().mean() > 5 and zero_frames.float().mean() > 4


# ----------------------------------------------------------------------------------------------------------------
# Recipes and the command line


@pytest.mark.parametrize("name", ["tiny", "as20k", "as2m", "esc50", "spcv2"])
def test_recipes_load(name):
    config = FinetuneConfig.from_yaml(name, data="somewhere", model="some/model")
    config.validate()
    assert resolve_recipe(name).name == f"finetune_{name}.yaml"


def test_paper_recipe_numbers():
    as20k, as2m = FinetuneConfig.from_yaml("as20k"), FinetuneConfig.from_yaml("as2m")
    esc50, spcv2 = FinetuneConfig.from_yaml("esc50"), FinetuneConfig.from_yaml("spcv2")
    assert (as20k.batch_size, as20k.max_steps, as20k.warmup_steps, as20k.learning_rate) == (48, 40000, 4000, 5e-5)
    assert (as2m.batch_size, as2m.max_steps, as2m.warmup_steps, as2m.balanced_sampling) == (96, 300000, 30000, True)
    assert (esc50.max_length, esc50.feature_preset, esc50.mixup_alpha, esc50.label_smoothing) == (None, "esc50", 0.0, 0.1)
    assert (spcv2.batch_size, spcv2.learning_rate, spcv2.loss, spcv2.noise) == (256, 2e-4, "bce", True)
    for recipe in (as20k, as2m, esc50, spcv2):
        assert recipe.effective_layer_decay() == 0.65 and recipe.drop_path_rate == 0.1
        assert (recipe.adam_beta1, recipe.adam_beta2, recipe.weight_decay) == (0.9, 0.95, 0.05)
    assert math.isclose(as20k.mixup_alpha, 0.8) and as20k.loss == "bce" and as20k.metric == "mAP"


def test_cli_help(capsys):
    from cat_hf.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["finetune", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--lora" in text and "--linear-probe" in text and "--merge" in text and "--config" in text


def test_loading_note_names_the_head_and_warns_about_encoder_weights(caplog):
    from cat_hf.finetune import describe_loading

    labels = {0: "dog", 1: "rain"}
    nothing = dict(missing_keys=set(), mismatched_keys=set(), unexpected_keys=set())
    assert describe_loading("clf", nothing, 2, labels, labels) == "model: encoder from clf, its head kept (same classes)"
    assert "(its head has other classes or another order)" in describe_loading(
        "clf", nothing, 2, {0: "rain", 1: "dog"}, labels)
    assert "(its head's classes are not recorded)" in describe_loading("org/clf", nothing, 2, None, labels)
    resized = dict(nothing, mismatched_keys={("classifier.weight", (5, 192), (2, 192))})
    assert "(its head has another size)" in describe_loading("clf", resized, 2, None, labels)
    assert not caplog.records

    foreign = dict(nothing, missing_keys={"classifier.weight", "cat.layers.0.mlp.fc1.weight"})
    note = describe_loading("other", foreign, 2, None, labels)
    assert note == "model: encoder from other, new classification head for 2 labels (it has none)"
    assert "1 encoder weights are not in other and start from random values: cat.layers.0.mlp.fc1.weight" in caplog.text


def test_encoder_weights_of_another_shape_are_reported_not_hidden(encoder_dir, tmp_path, caplog):
    """ignore_mismatched_sizes (for a head of another size) must not silently reset encoder weights: an edited
    config.json that no longer fits the weights gets a warning naming them."""
    from cat_hf.finetune import build_model

    folder = tmp_path / "edited"
    shutil.copytree(encoder_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_time_patches"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    from cat_hf.finetune import PreparedData

    data = PreparedData(train=None, validation=None, test=None, label2id={"a": 0, "b": 1}, id2label={0: "a", 1: "b"},
                        problem_type="single_label_classification", summaries={})
    notes = []
    build_model(FinetuneConfig(model=str(folder)), data, say=notes.append)
    assert notes == [f"model: encoder from {folder}, new classification head for 2 labels (it has none)"]
    assert "cat.embeddings.position_embeddings" in caplog.text and "another shape" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Short clips, grouped validation, the log-mel baseline


def test_short_clips_are_padded_to_the_batch_with_a_mask_not_to_max_length():
    from cat_hf.training import featurize

    extractor = CATFeatureExtractor(max_length=256)
    waves = torch.zeros(3, 32000)
    waves[:, :3200] = torch.randn(3, 3200) * 0.1
    lengths = torch.tensor([3200, 1600, 400])  # 0.2 s, 0.1 s and one 25 ms frame
    features, mask = featurize(extractor, waves, lengths, torch.device("cpu"), "longest")
    assert features.shape == (3, 32, 128) and mask.shape == (3, 32)  # 0.2 s = 18 frames -> two patches, not 256 frames
    assert mask.sum(1).tolist() == [18, 8, 1]
    fixed, no_mask = featurize(extractor, waves, lengths, torch.device("cpu"), "max_length")
    assert fixed.shape == (3, 256, 128) and no_mask is None  # the paper recipes' padding
    torch.testing.assert_close(fixed[:, :18], features[:, :18])


def test_validation_can_hold_out_whole_speakers(tmp_path):
    from cat_hf.finetune import prepare_data

    rng = np.random.default_rng(0)
    lines = ["path,label,speaker"]
    for speaker in range(6):
        folder = tmp_path / f"speaker{speaker}"
        folder.mkdir()
        for i, kind in enumerate(CLASSES * 2):
            sf.write(folder / f"{i}.wav", synth(kind, 0.3, rng), SR)
            lines.append(f"speaker{speaker}/{i}.wav,{kind},s{speaker}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    for group_by in ("speaker", "folder:1"):
        config = FinetuneConfig.from_dict(dict(data=str(tmp_path / "train.csv"), validation_size=0.3,
                                               validation_group_by=group_by))
        data = prepare_data(config)
        def speakers(dataset):
            return {Path(entry["path"]).parent.name for entry in dataset.cast_column(
                "audio", __import__("datasets").Audio(decode=False))["audio"]}
        held_out, trained = speakers(data.validation), speakers(data.train)
        assert held_out and trained and not held_out & trained, (group_by, held_out, trained)
        assert data.summaries["validation"]["grouped_by"] == group_by
    with pytest.raises(CorpusError, match="not a column"):
        prepare_data(FinetuneConfig.from_dict(dict(data=str(tmp_path / "train.csv"), validation_group_by="room")))
    with pytest.raises(FinetuneConfigError, match="folder:K"):
        prepare_data(FinetuneConfig.from_dict(dict(data=str(tmp_path / "train.csv"), validation_group_by="folder:x")))


def test_finetune_reports_the_log_mel_baseline_and_evaluate_refits_it(corpus, encoder_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = finetune(run_settings(corpus, encoder_dir, out, max_steps=6, threads=1))
    baseline = result["baseline"]
    # tones, noise and clicks differ in their spectra: log-mel statistics separate them
    assert baseline["metric"] == "accuracy" and baseline["score"] > 0.9 and baseline["split"] == "validation"
    assert json.loads((out / "training_summary.json").read_text())["baseline"] == baseline
    extractor = CATFeatureExtractor.from_pretrained(out)
    assert extractor.padding == "longest"  # whole clips reach the model, which scores long ones by windows of
    assert json.loads((out / "config.json").read_text())["window_frames"] == extractor.max_length  # the training length

    from cat_hf.cli import main as cli

    assert cli(["evaluate", str(out), str(corpus), "--baseline", "--output-dir", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "baseline: log-mel statistics + logistic regression" in printed
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["baseline"]["score"] > 0.9 and results["baseline"]["train_data"] == str(corpus)
