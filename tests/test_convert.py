"""Conversion of the authors' checkpoints: command line, both stems, fp16 upcast, teacher export, and errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification

from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATForPreTraining, CATModel
from cat_hf.convert import CheckpointConversionError, convert_checkpoint

from original_format import finetuning_checkpoint, pretraining_checkpoint


def small_pretraining_model(stem_type: str, seed: int = 0, **stem) -> CATForPreTraining:
    torch.manual_seed(seed)
    stem = stem or {"stem_channels": [32, 48], "stem_depths": [2, 1]}
    config = CATConfig(hidden_size=96, num_hidden_layers=3, num_attention_heads=2, stem_type=stem_type,
                       max_time_patches=64, decoder_groups=8, rr_embedding_dim=24, **stem)
    model = CATForPreTraining(config)
    with torch.no_grad():  # a teacher that differs from the student, as after training
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("teacher."):
                p.copy_(p.half().float())
        for name, b in model.named_buffers():
            b.copy_(b.half().float())
    return model


@pytest.mark.parametrize("stem_type", ["multires", "patch"])
def test_pretraining_checkpoint_round_trip(tmp_path, stem_type):
    model = fp16_rounded(small_pretraining_model(stem_type))
    path = tmp_path / "checkpoint.pt"
    torch.save(pretraining_checkpoint(model), path)
    out = convert_checkpoint(path, tmp_path / "converted")
    converted = CATForPreTraining.from_pretrained(out)
    assert converted.config.stem_type == stem_type
    if stem_type == "multires":
        assert converted.config.stem_depths == [2, 1] and converted.config.stem_channels == [32, 48]
    assert converted.config.rr_embedding_dim == 24 and converted.config.num_hidden_layers == 3
    assert converted.cat.embeddings.cls_token.dtype == torch.float32  # fp16 upcast
    for (name, a), b in zip(model.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), name
    # The encoder-only Auto classes and the feature extractor load the same folder.
    assert isinstance(AutoModel.from_pretrained(out), CATModel)
    extractor = AutoFeatureExtractor.from_pretrained(out)
    assert isinstance(extractor, CATFeatureExtractor) and extractor.max_length == 1024
    x = torch.randn(1, 128, 128)
    with torch.no_grad():
        assert torch.allclose(AutoModel.from_pretrained(out)(x).last_hidden_state, model.cat(x).last_hidden_state,
                              atol=1e-6)


def test_teacher_export_from_command_line(tmp_path):
    model = fp16_rounded(small_pretraining_model("multires", seed=1))
    path = tmp_path / "checkpoint.pt"
    torch.save(pretraining_checkpoint(model), path)
    result = subprocess.run([sys.executable, "-m", "cat_hf.cli", "convert", str(path), str(tmp_path / "teacher"),
                             "--teacher"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    teacher = AutoModel.from_pretrained(tmp_path / "teacher")
    for (name, a), b in zip(model.teacher.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), name


def test_finetuning_checkpoint_with_esc50_task(tmp_path):
    torch.manual_seed(2)
    config = CATConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, stem_type="patch",
                       max_time_patches=64, num_labels=5, decoder_groups=8)
    classifier = CATForAudioClassification(config).eval()
    fp16_rounded(classifier)
    labels = ["dog", "rooster", "pig", "cow", "frog"]
    path = tmp_path / "esc.pt"
    torch.save(finetuning_checkpoint(classifier, labels, esc50=True, target_length=512), path)
    out = convert_checkpoint(path, tmp_path / "esc")
    converted = AutoModelForAudioClassification.from_pretrained(out).eval()
    assert converted.config.id2label == dict(enumerate(labels))
    assert converted.config.problem_type == "single_label_classification"
    extractor = json.loads((out / "preprocessor_config.json").read_text())
    assert (extractor["max_length"], extractor["mean"], extractor["std"]) == (512, -6.627, 5.359)  # ESC-50 recipe
    x = torch.randn(2, 512, 128)
    with torch.no_grad():
        assert torch.allclose(converted(x).logits, classifier(x).logits, atol=1e-6)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    with pytest.raises(CheckpointConversionError, match="not a checkpoint torch.load"):
        convert_checkpoint(bad, tmp_path / "out")
    torch.save(small_pretraining_model("patch").state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointConversionError, match=r"bare state dict \(\d+ tensors.*not its weights alone"):
        convert_checkpoint(tmp_path / "weights.pt", tmp_path / "out")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointConversionError, match="expected a dict with 'model' and 'cfg'"):
        convert_checkpoint(tmp_path / "other.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _broken(tmp_path, checkpoint: dict, change) -> Path:
    change(checkpoint["model"])
    path = tmp_path / f"broken-{len(list(tmp_path.glob('broken-*')))}.pt"
    torch.save(checkpoint, path)
    return path


def _shrink_qkv(state: dict) -> None:
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:, :-3]


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
@pytest.mark.parametrize(("change", "message"), [
    (lambda state: state.pop("blocks.1.mlp.fc2.weight"), r"Missing keys: \['blocks\.1\.mlp\.fc2\.weight'\]"),
    (lambda state: state.pop("modality_encoders.IMAGE.decoder.proj.bias"),
     r"Missing keys: \['modality_encoders\.IMAGE\.decoder\.proj\.bias'\]"),
    (lambda state: state.update({"modality_encoders.IMAGE.mystery.weight": torch.zeros(3)}),
     r"unexpected keys.*'modality_encoders\.IMAGE\.mystery\.weight'"),
    (_shrink_qkv, r"each third of blocks\.0\.attn\.qkv\.weight has shape \(96, 93\) in the checkpoint.*needs \(96, 96\)"),
    (lambda state: state["_ema"].pop("blocks.1.norm2.bias"), r"Missing keys: \[\"model\['_ema'\] blocks\.1\.norm2\.bias\"\]"),
], ids=["missing", "missing-decoder", "unexpected", "shape", "missing-teacher"])
def test_broken_checkpoints_are_refused_naming_their_keys_and_nothing_is_written(tmp_path, change, message, teacher):
    """Errors name the keys as the checkpoint has them; --teacher checks the whole checkpoint as well."""
    path = _broken(tmp_path, pretraining_checkpoint(small_pretraining_model("multires")), change)
    with pytest.raises(CheckpointConversionError, match=message) as error:
        convert_checkpoint(path, tmp_path / "out", teacher=teacher)
    assert "cat." not in str(error.value) and "layers." not in str(error.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no staging folder left behind


def test_finetuning_checkpoint_errors_name_its_keys(tmp_path):
    _, checkpoint, _ = _finetuned(tmp_path)
    path = _broken(tmp_path, checkpoint, lambda state: (state.pop("head.weight"), state.pop("model.blocks.0.norm1.bias")))
    with pytest.raises(CheckpointConversionError, match=r"Missing keys: \['head\.weight', 'model\.blocks\.0\.norm1\.bias'\]"):
        convert_checkpoint(path, tmp_path / "out")


def test_command_line_reports_errors(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00\x01")
    result = subprocess.run([sys.executable, "-m", "cat_hf.cli", "convert", str(tmp_path / "bad.pt"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not a checkpoint" in result.stderr and not result.stdout
    assert not (tmp_path / "out").exists()
    help_text = subprocess.run([sys.executable, "-m", "cat_hf.cli", "convert", "--help"], capture_output=True,
                               text=True, timeout=300).stdout
    assert "--teacher" in help_text


def test_refuses_to_overwrite(tmp_path, pretrain_checkpoint):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_checkpoint(pretrain_checkpoint, target)
    assert (target / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------------
# Variants of the authors' checkpoints beyond the fixture
# ------------------------------------------------------------------------------------------------------------


def test_numpy_values_saved_by_the_trainer_are_read(tmp_path):
    """fairseq stores validation metrics (the best mAP is a numpy float64) next to the weights."""
    from cat_hf.convert import _numpy_data_global

    model = small_pretraining_model("patch")
    checkpoint = pretraining_checkpoint(model)
    checkpoint["extra_state"] = {"val_loss": np.float64(0.412), "best": np.float32(0.4), "epoch": np.int64(7),
                                 "history": np.arange(3.0), "ok": np.bool_(True)}
    checkpoint["optimizer_history"] = [{"lr_scheduler_state": {"best": np.float64(0.412)}, "num_updates": 100}]
    torch.save(checkpoint, tmp_path / "with_numpy.pt")
    out = convert_checkpoint(tmp_path / "with_numpy.pt", tmp_path / "out")
    assert isinstance(AutoModel.from_pretrained(out), CATModel)
    # numpy 1.x pickles its scalars under numpy.core, numpy 2.x under numpy._core: both names resolve.
    assert _numpy_data_global("numpy.core.multiarray.scalar") is _numpy_data_global("numpy._core.multiarray.scalar")
    assert _numpy_data_global("numpy.dtypes.Float64DType") is type(np.dtype("float64"))
    assert _numpy_data_global("os.system") is None and _numpy_data_global("numpy.load") is None


def test_objects_that_are_not_data_are_refused_by_name(tmp_path):
    checkpoint = pretraining_checkpoint(small_pretraining_model("patch"))
    checkpoint["args"] = argparse.Namespace(arch="cat")
    checkpoint["extra_state"] = {"val_loss": np.float64(0.4)}
    torch.save(checkpoint, tmp_path / "namespace.pt")
    with pytest.raises(CheckpointConversionError, match=r"refuses to unpickle: \['argparse.Namespace'\]"):
        convert_checkpoint(tmp_path / "namespace.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_teacher_of_ema_encoder_only_runs_on_the_student_embeddings(tmp_path):
    """ema_encoder_only: `_ema` holds the transformer blocks only ('0.norm1.weight', ...)."""
    model = fp16_rounded(small_pretraining_model("multires", seed=3))
    checkpoint = pretraining_checkpoint(model)
    checkpoint["model"]["_ema"] = {k[len("blocks."):]: v for k, v in checkpoint["model"]["_ema"].items()
                                   if k.startswith("blocks.")}
    checkpoint["cfg"]["model"]["ema_encoder_only"] = True
    torch.save(checkpoint, tmp_path / "encoder_only.pt")
    converted = CATForPreTraining.from_pretrained(convert_checkpoint(tmp_path / "encoder_only.pt", tmp_path / "a"))
    teacher = AutoModel.from_pretrained(convert_checkpoint(tmp_path / "encoder_only.pt", tmp_path / "b", teacher=True))
    for name, value in teacher.state_dict().items():
        source = model.cat if name.startswith("embeddings.") else model.teacher
        assert torch.equal(value, source.state_dict()[name]), name
        assert torch.equal(value, converted.teacher.state_dict()[name]), name
    # Missing block weights are not filled in from the student.
    del checkpoint["model"]["_ema"]["1.mlp.fc1.weight"]
    torch.save(checkpoint, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointConversionError, match=r"_ema'\] blocks\.1\.mlp\.fc1\.weight"):
        convert_checkpoint(tmp_path / "incomplete.pt", tmp_path / "c")


@pytest.mark.parametrize("stem_type", ["multires", "patch"])
def test_teacher_without_its_own_local_encoder_runs_on_the_student_stem(tmp_path, stem_type, caplog):
    """ema_local_encoder=false: the original's teacher copy has its local encoder set to None and reads the student's
    stem output (then its own positions, CLS, context norm and blocks). The patch stem is then missing from `_ema`;
    the convolutional stem's weights are still saved there, but unused."""
    model = fp16_rounded(small_pretraining_model(stem_type, seed=5))
    checkpoint = pretraining_checkpoint(model)
    checkpoint["cfg"]["model"]["modalities"]["image"]["ema_local_encoder"] = False
    if stem_type == "patch":
        checkpoint["model"]["_ema"] = {k: v for k, v in checkpoint["model"]["_ema"].items()
                                       if not k.startswith("modality_encoders.IMAGE.local_encoder.")}
    torch.save(checkpoint, tmp_path / "shared_stem.pt")
    teacher = AutoModel.from_pretrained(convert_checkpoint(tmp_path / "shared_stem.pt", tmp_path / "t", teacher=True))
    assert "ema_local_encoder=false" in caplog.text
    unused_ema_stem = 0
    for name, value in teacher.state_dict().items():
        source = model.cat if name.startswith("embeddings.stem.") else model.teacher
        assert torch.equal(value, source.state_dict()[name]), name
        unused_ema_stem += name.startswith("embeddings.stem.") and not torch.equal(value, model.teacher.state_dict()[name])
    if stem_type == "multires":
        assert unused_ema_stem > 0  # the EMA copy of the conv stem, saved in `_ema`, differs and is not used


def _finetuned(tmp_path, *, norm_eps: float = 1e-6, **model_overrides):
    torch.manual_seed(4)
    config = CATConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, stem_type="patch",
                       max_time_patches=64, num_labels=3, decoder_groups=8, layer_norm_eps=norm_eps)
    classifier = fp16_rounded(CATForAudioClassification(config).eval())
    checkpoint = finetuning_checkpoint(classifier, ["a", "b", "c"])
    checkpoint["cfg"]["model"].update(model_overrides)
    path = tmp_path / f"finetuned-{len(list(tmp_path.iterdir()))}.pt"
    torch.save(checkpoint, path)
    return classifier, checkpoint, path


def test_problem_type_follows_the_original_loss(tmp_path):
    """Multi-label (sigmoid) only where the original trains with BCE: audio_mae without esc50/spcv2."""
    expected = {(True, False): "multi_label_classification", (False, False): "single_label_classification",
                (True, True): "single_label_classification"}
    for (audio_mae, spcv2), problem_type in expected.items():
        _, _, path = _finetuned(tmp_path, audio_mae=audio_mae, spcv2_eval=spcv2)
        out = convert_checkpoint(path, tmp_path / f"out-{audio_mae}-{spcv2}")
        assert CATConfig.from_pretrained(out).problem_type == problem_type


def test_fc_norm_eps_is_fixed_like_the_original(tmp_path):
    """The original's fc_norm always has eps 1e-6, whatever norm_eps the blocks use."""
    classifier, _, path = _finetuned(tmp_path, norm_eps=1e-5)
    converted = AutoModelForAudioClassification.from_pretrained(convert_checkpoint(path, tmp_path / "out")).eval()
    assert converted.cat.layers[0].norm1.eps == 1e-5 and converted.fc_norm.eps == 1e-6
    x = torch.randn(2, 256, 128)
    with torch.no_grad():
        features = converted.cat(x).pooler_output
        expected = converted.classifier(torch.nn.functional.layer_norm(
            features, (96,), converted.fc_norm.weight, converted.fc_norm.bias, eps=1e-6))
        assert torch.allclose(converted(x).logits, expected, atol=1e-6)
        assert torch.allclose(features, classifier.cat(x).pooler_output, atol=1e-5)


@pytest.mark.parametrize(
    ("finetuning_setting", "overrides", "message"),
    [(True, {"linear_layer": 1}, "linear_layer=1"),
     (True, {"add_bottleneck": True, "bottleneck_dim": 64}, "add_bottleneck"),  # the finetuning run's override
     (False, {"add_bottleneck": True, "bottleneck_dim": 64}, "add_bottleneck"),
     (False, {"layer_norm_first": True}, "layer_norm_first")],
)
def test_unsupported_variants_are_named(tmp_path, finetuning_setting, overrides, message):
    """Settings of the finetuning model or of the pretrained model it was built from."""
    _, checkpoint, path = _finetuned(tmp_path)
    model_cfg = checkpoint["cfg"]["model"]
    (model_cfg if finetuning_setting else model_cfg["pretrained_model_args"]["model"]).update(overrides)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointConversionError, match=message):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_finetuning_run_can_switch_the_pretrained_bottleneck_off(tmp_path):
    """The original replaces the pretrained add_bottleneck by the finetuning run's own setting when it has one."""
    classifier, checkpoint, path = _finetuned(tmp_path, add_bottleneck=False)
    checkpoint["cfg"]["model"]["pretrained_model_args"]["model"].update(add_bottleneck=True, bottleneck_dim=64)
    torch.save(checkpoint, path)
    converted = CATForAudioClassification.from_pretrained(convert_checkpoint(path, tmp_path / "out")).eval()
    x = torch.randn(1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, classifier(x).logits, atol=1e-6, rtol=0)


def test_pretraining_objective_settings_do_not_block_finetuning_checkpoints(tmp_path):
    """Loss settings of the pretraining run (smooth-L1 targets, KL RR, a projector of another direction, a narrower
    decoder) are dropped with the pretraining modules when the original finetunes: the classifier converts exactly."""
    classifier, checkpoint, path = _finetuned(tmp_path)
    checkpoint["cfg"]["model"]["pretrained_model_args"]["model"].update(
        loss_beta=0.25, clap_loss=1.0, clap_loss_type="ce", proj_type=1, end_of_block_targets=True)
    checkpoint["cfg"]["model"]["pretrained_model_args"]["model"]["modalities"]["image"]["decoder"]["decoder_dim"] = 48
    checkpoint["model"]["model.clap_proj.weight"] = torch.zeros(96, 512).half()  # proj_type 1: 512-d CLAP -> model
    checkpoint["model"]["model.clap_proj.bias"] = torch.zeros(96).half()
    torch.save(checkpoint, path)
    converted = CATForAudioClassification.from_pretrained(convert_checkpoint(path, tmp_path / "out")).eval()
    x = torch.randn(1, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, classifier(x).logits, atol=1e-6, rtol=0)


def test_pretraining_objective_settings_are_converted_with_a_warning(tmp_path, caplog):
    model = fp16_rounded(small_pretraining_model("patch"))
    checkpoint = pretraining_checkpoint(model)
    checkpoint["cfg"]["model"].update(loss_beta=0.25, proj_type=1, clap_loss=0.5)
    checkpoint["model"]["clap_proj.weight"] = torch.zeros(96, 24).half()  # proj_type 1: external -> model
    checkpoint["model"]["clap_proj.bias"] = torch.zeros(96).half()
    torch.save(checkpoint, tmp_path / "objective.pt")
    converted = CATForPreTraining.from_pretrained(convert_checkpoint(tmp_path / "objective.pt", tmp_path / "out"))
    assert "'loss_beta': 0.25" in caplog.text and "'proj_type': 1" in caplog.text and "not converted" in caplog.text
    assert converted.config.rr_embedding_dim is None and converted.config.rr_loss_weight == 0.0
    x = torch.randn(1, 128, 128)
    with torch.no_grad():
        assert torch.equal(converted.cat(x).last_hidden_state, model.cat(x).last_hidden_state)
        assert torch.equal(converted.teacher(x).last_hidden_state, model.teacher(x).last_hidden_state)


def test_pretraining_decoder_of_another_width_is_refused(tmp_path):
    checkpoint = pretraining_checkpoint(small_pretraining_model("patch"))
    checkpoint["cfg"]["model"]["modalities"]["image"]["decoder"]["decoder_dim"] = 48
    torch.save(checkpoint, tmp_path / "narrow.pt")
    with pytest.raises(CheckpointConversionError, match="decoder_dim 48 != embed_dim 96.*finetuning checkpoints"):
        convert_checkpoint(tmp_path / "narrow.pt", tmp_path / "out")


def test_labels_that_are_not_indices_are_reported(tmp_path):
    _, checkpoint, path = _finetuned(tmp_path)
    checkpoint["task_state"] = {"labels": {"index": "mid", "a": "0", "b": "1"}}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointConversionError, match="must map names to class indices"):
        convert_checkpoint(path, tmp_path / "out")


def test_average_top_k_beyond_depth_means_all_blocks(tmp_path):
    checkpoint = pretraining_checkpoint(small_pretraining_model("patch"))
    checkpoint["cfg"]["model"]["average_top_k_layers"] = 8  # the model has 3 blocks
    torch.save(checkpoint, tmp_path / "topk.pt")
    assert CATConfig.from_pretrained(convert_checkpoint(tmp_path / "topk.pt", tmp_path / "out")).average_top_k_layers == 3


def test_single_stage_convolutional_stem(tmp_path):
    """The authors' conv_option 1: one stride-16 convolution with its LayerNorm, then the token Linear."""
    model = fp16_rounded(small_pretraining_model("multires", stem_strides=[16], stem_channels=[], stem_depths=[]))
    torch.save(pretraining_checkpoint(model), tmp_path / "conv1.pt")
    converted = CATForPreTraining.from_pretrained(convert_checkpoint(tmp_path / "conv1.pt", tmp_path / "out"))
    assert (converted.config.stem_type, converted.config.stem_strides) == ("multires", [16])
    x = torch.randn(1, 128, 128)
    with torch.no_grad():
        assert torch.equal(converted.cat(x).last_hidden_state, model.cat(x).last_hidden_state)


def test_rr_settings_of_a_run_without_rr_are_ignored(tmp_path):
    """The authors' scripts leave clap_loss_type set when clap_loss is 0: nothing to refuse then."""
    _, checkpoint, path = _finetuned(tmp_path)
    checkpoint["cfg"]["model"]["pretrained_model_args"]["model"].update(clap_loss=0, clap_loss_type="ce", proj_type=1)
    torch.save(checkpoint, path)
    assert CATConfig.from_pretrained(convert_checkpoint(path, tmp_path / "out")).rr_loss_type == "mse"


def test_four_stage_stem_with_32_frame_patches(tmp_path):
    """The authors' conv_option 6 (resolutions 4, 8, 16, 32): patches of 32 frames, and the extractor pads to them.
    Their cfg keeps patch_size 16; the tokens take the positional table's rows in order, as ours do."""
    model = fp16_rounded(small_pretraining_model("multires", patch_size=32, stem_strides=[4, 2, 2, 2],
                                                 stem_channels=[16, 24, 32], stem_depths=[1, 1, 1]))
    checkpoint = pretraining_checkpoint(model)
    checkpoint["cfg"]["model"]["modalities"]["image"]["patch_size"] = 16
    torch.save(checkpoint, tmp_path / "conv6.pt")
    out = convert_checkpoint(tmp_path / "conv6.pt", tmp_path / "out")
    converted = AutoModel.from_pretrained(out)
    assert (converted.config.patch_size, converted.config.stem_strides) == (32, [4, 2, 2, 2])
    extractor = AutoFeatureExtractor.from_pretrained(out)
    features = extractor([np.zeros(16000 * 3, dtype=np.float32)], sampling_rate=16000, padding="longest",
                         return_tensors="pt")["input_values"]
    assert features.shape[1] % 32 == 0
    x = torch.randn(1, 256, 128)
    with torch.no_grad():
        assert torch.equal(converted(x).last_hidden_state, model.cat(x).last_hidden_state)


def test_two_stage_stem_with_8_frame_patches(tmp_path):
    """The authors' conv_option 2 (resolutions 4 and 8): 8x8 patches, 16 per time step, cfg patch_size still 16."""
    model = fp16_rounded(small_pretraining_model("multires", patch_size=8, stem_strides=[4, 2],
                                                 stem_channels=[16], stem_depths=[1]))
    checkpoint = pretraining_checkpoint(model)
    checkpoint["cfg"]["model"]["modalities"]["image"]["patch_size"] = 16
    torch.save(checkpoint, tmp_path / "conv2.pt")
    converted = AutoModel.from_pretrained(convert_checkpoint(tmp_path / "conv2.pt", tmp_path / "out"))
    assert (converted.config.patch_size, converted.config.max_time_patches) == (8, 64)
    x = torch.randn(1, 64, 128)
    with torch.no_grad():
        hidden = converted(x).last_hidden_state
        assert hidden.shape[1] == 1 + 8 * 16
        assert torch.equal(hidden, model.cat(x).last_hidden_state)


@pytest.mark.parametrize("pooling", ["mean", "lin_softmax"])
def test_finetuning_checkpoints_of_other_prediction_modes(tmp_path, pooling):
    """MEAN_POOLING and LIN_SOFTMAX pool the patch tokens (the original removes the extra tokens for them)."""
    classifier, checkpoint, path = _finetuned(tmp_path)
    classifier.config.pooling = pooling
    checkpoint = finetuning_checkpoint(classifier, ["a", "b", "c"])
    assert checkpoint["cfg"]["model"]["prediction_mode"] == {"mean": "MEAN_POOLING", "lin_softmax": "LIN_SOFTMAX"}[pooling]
    torch.save(checkpoint, path)
    converted = CATForAudioClassification.from_pretrained(convert_checkpoint(path, tmp_path / "out")).eval()
    assert converted.config.pooling == pooling
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).logits, classifier(x).logits, atol=1e-6, rtol=0)

    checkpoint["cfg"]["model"]["prediction_mode"] = "CLAP_TYPE2"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointConversionError, match="prediction_mode CLAP_TYPE2 is not supported"):
        convert_checkpoint(path, tmp_path / "refused")


@pytest.mark.parametrize(("proj_type", "clap_loss"), [(None, 1.0), (2, 0.0)])
def test_rr_counts_only_where_the_original_trained_it(tmp_path, proj_type, clap_loss):
    """The original adds the RR loss only with a proj_type and clap_loss > 0; otherwise the converted model's RR
    weight is 0, so that continued pretraining does not switch RR on."""
    checkpoint = pretraining_checkpoint(small_pretraining_model("patch"))
    checkpoint["cfg"]["model"].update(proj_type=proj_type, clap_loss=clap_loss)
    if proj_type is None:  # the original builds no projector then
        del checkpoint["model"]["clap_proj.weight"], checkpoint["model"]["clap_proj.bias"]
    torch.save(checkpoint, tmp_path / "no_rr.pt")
    config = CATConfig.from_pretrained(convert_checkpoint(tmp_path / "no_rr.pt", tmp_path / "out"))
    assert config.rr_loss_weight == 0.0
    assert config.rr_embedding_dim == (None if proj_type is None else 24)


def test_patch_stem_of_another_width_is_named(tmp_path):
    """modalities.image.embed_dim != embed_dim: the original puts a Linear after the patch stem (local_encoder.0/.1)."""
    checkpoint = pretraining_checkpoint(small_pretraining_model("patch"))
    state = checkpoint["model"]
    for part in ("weight", "bias"):
        state[f"modality_encoders.IMAGE.local_encoder.0.proj.{part}"] = state.pop(
            f"modality_encoders.IMAGE.local_encoder.proj.{part}")
    state["modality_encoders.IMAGE.local_encoder.1.weight"] = torch.zeros(96, 96).half()
    checkpoint["cfg"]["model"]["modalities"]["image"]["embed_dim"] = 64
    torch.save(checkpoint, tmp_path / "narrow_stem.pt")
    with pytest.raises(CheckpointConversionError, match="modalities.image.embed_dim 64 != embed_dim 96"):
        convert_checkpoint(tmp_path / "narrow_stem.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fbank_rate_of_the_downsr_16hz_false_recipe(tmp_path, caplog, capsys):
    """downsr_16hz=false trained on fbanks at the files' own rate: a warning naming --sampling-rate, or that rate."""
    classifier, checkpoint, path = _finetuned(tmp_path)
    checkpoint["cfg"]["task"]["downsr_16hz"] = False
    torch.save(checkpoint, path)
    default = CATFeatureExtractor.from_pretrained(convert_checkpoint(path, tmp_path / "default"))
    assert default.sampling_rate == 16000 and "--sampling-rate 32000" in caplog.text
    caplog.clear()
    from cat_hf import cli

    assert cli.main(["convert", str(path), str(tmp_path / "native"), "--sampling-rate", "32000"]) == 0
    assert "downsr_16hz" not in caplog.text
    native = CATFeatureExtractor.from_pretrained(tmp_path / "native")
    assert (native.sampling_rate, native.max_length) == (32000, default.max_length)
    assert cli.main(["convert", str(path), str(tmp_path / "bad"), "--sampling-rate", "0"]) == 2
    assert "sampling_rate must be a positive number of Hz" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    checkpoint["cfg"]["task"]["downsr_16hz"] = True  # a 16 kHz recipe: another rate is most likely a mistake
    torch.save(checkpoint, path)
    convert_checkpoint(path, tmp_path / "mistaken", sampling_rate=32000)
    assert "expects 16 kHz fbanks" in caplog.text


def test_a_cfg_without_ema_local_encoder_reads_it_off_the_saved_teacher(tmp_path):
    """The original's default is false (the teacher has no patch stem of its own); a patch stem in `_ema` says true."""
    model = fp16_rounded(small_pretraining_model("patch", seed=6))
    checkpoint = pretraining_checkpoint(model)
    del checkpoint["cfg"]["model"]["modalities"]["image"]["ema_local_encoder"]
    torch.save(checkpoint, tmp_path / "own_stem.pt")
    teacher = AutoModel.from_pretrained(convert_checkpoint(tmp_path / "own_stem.pt", tmp_path / "t", teacher=True))
    assert torch.equal(teacher.embeddings.stem.proj.weight, model.teacher.embeddings.stem.proj.weight)
    assert not torch.equal(teacher.embeddings.stem.proj.weight, model.cat.embeddings.stem.proj.weight)
