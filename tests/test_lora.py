"""LoRA: trainable share, adapter-only saving, reload with PeftModel, merge equality, and training under Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from peft import PeftModel
from safetensors.torch import load_file
from synthetic_audio import CLASSES, SR, synth

import cat_hf  # noqa: F401 - Auto-class registration
from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATModel
from cat_hf.finetune import finetune, main
from cat_hf.inference import load_classifier
from cat_hf.lora import (
    CLASSIFIER_CONFIG_NAME,
    LoraSettings,
    add_lora,
    count_parameters,
    load_lora_model,
    merge_lora,
)

LABEL_KWARGS = dict(num_labels=3, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
                    problem_type="single_label_classification")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-corpus") / "sounds"
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(8):
            sf.write(root / kind / f"{i}.wav", synth(kind, 0.7, rng), SR)
    return root


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lora-encoder") / "cat-micro"
    config = CATConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, stem_channels=[16, 32],
                       stem_depths=[1, 1], rr_embedding_dim=None)  # fmt: skip
    CATModel(config).save_pretrained(folder)
    CATFeatureExtractor(max_length=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(corpus, encoder_dir, tmp_path_factory) -> tuple[Path, dict, str]:
    """One LoRA finetuning run with --merge (a high learning rate, so the adapter really moves)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("lora-run") / "adapter"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = lora_finetune(corpus, encoder_dir, out, merge=True, max_steps=6, eval_steps=3)
    return out, result, printed.getvalue()


def lora_finetune(corpus: Path, encoder_dir: Path, out: Path, **overrides) -> dict:
    """A short LoRA finetuning run of the micro encoder, at a learning rate high enough that the adapter moves."""
    return finetune(dict(
        data=str(corpus), model=str(encoder_dir), output_dir=str(out), lora=True, warmup_steps=1, learning_rate=1e-2,
        batch_size=8, num_workers=0, validation_size=0.25, **overrides,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    rng = np.random.default_rng(5)
    clips = [synth(kind, 0.7, rng) for kind in CLASSES * 2]
    return CATFeatureExtractor(max_length=64)(clips, sampling_rate=SR, return_tensors="pt")["input_values"]


# ----------------------------------------------------------------------------------------------------------------


def test_trainable_share_on_cat_tiny_is_below_five_percent(capsys):
    model = CATForAudioClassification(CATConfig.from_preset("cat-tiny", num_labels=10))
    total_before = sum(p.numel() for p in model.parameters())
    peft_model = add_lora(model)
    printed = capsys.readouterr().out
    assert "LoRA: trainable params:" in printed and "trainable%:" in printed

    trainable, total = count_parameters(peft_model)
    hidden, layers = 192, 4
    lora = layers * 2 * (8 * hidden + hidden * 8)  # A (r x D) + B (D x r) on q_proj and v_proj
    head = 2 * hidden + hidden * 10 + 10  # fc_norm + classifier, trained in full
    assert trainable == lora + head
    assert total == total_before + lora
    assert trainable / total < 0.05
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".modules_to_save." in n for n in names)
    assert LoraSettings().to_peft_config().target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_adapters_get_their_gradients_under_activation_checkpointing(use_reentrant):
    """Checkpointing enabled before wrapping, as PEFT documents: PEFT then hooks the model's input embeddings (the
    stem) to require grad, without which reentrant checkpointing of the frozen blocks gives the adapters no gradient."""
    features, labels = torch.randn(2, 64, 128), torch.tensor([0, 2])

    def adapter_gradients(checkpointing: bool) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        model = CATForAudioClassification(CATConfig.from_preset("cat-tiny", num_hidden_layers=2, **LABEL_KWARGS))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        peft_model = add_lora(model, verbose=False)
        peft_model.train()
        peft_model(input_values=features, labels=labels).loss.backward()
        return {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = adapter_gradients(False), adapter_gradients(True)
    assert plain.keys() == checkpointed.keys() and any("lora_B" in name for name in plain)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5)


def test_lora_finetuning_with_activation_checkpointing(corpus, encoder_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    lora_finetune(corpus, encoder_dir, out, activation_checkpointing=True, max_steps=2, eval_steps=2)
    assert "activation checkpointing" in capsys.readouterr().out
    lora_b = [v for k, v in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: every one received gradients


def test_wrapping_and_loading_do_not_repeat_peft_deprecation_warnings(lora_run, recwarn):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` on every wrap and load; users cannot act on it."""
    out, _, _ = lora_run
    load_lora_model(out)
    add_lora(CATForAudioClassification(CATConfig.from_preset("cat-tiny", num_hidden_layers=1, **LABEL_KWARGS)),
             verbose=False)
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]


def test_add_lora_rejects_unknown_modules():
    model = CATForAudioClassification(CATConfig.from_preset("cat-tiny", num_hidden_layers=1, num_labels=2))
    with pytest.raises(ValueError, match="not Linear layers"):
        add_lora(model, LoraSettings(target_modules=["query"]))
    with pytest.raises(ValueError, match="functional GEMMs"):  # a Linear, but the stem never calls its forward
        add_lora(model, LoraSettings(target_modules=["q_proj", "token_proj"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        add_lora(model, LoraSettings(modules_to_save=["head"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        add_lora(model, LoraSettings(modules_to_save=["orm1"]))  # a name's last parts, not any substring


def test_adapter_folder_is_small_and_self_describing(lora_run, encoder_dir):
    out, result, printed = lora_run
    assert "lora: trainable params:" in printed
    assert f"merged model (for pipeline) in {out / 'merged'}" in printed
    assert result["mode"] == "lora" and result["trainable_share"] < 0.05 and result["layer_decay"] == 1.0
    for name in ("adapter_model.safetensors", "adapter_config.json", CLASSIFIER_CONFIG_NAME,
                 "preprocessor_config.json", "training_summary.json", "eval_results.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()

    adapter_size = (out / "adapter_model.safetensors").stat().st_size
    model_size = (out / "merged" / "model.safetensors").stat().st_size
    assert adapter_size < 0.05 * model_size, (adapter_size, model_size)

    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(encoder_dir.resolve())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (8, 16, 0.1)
    assert set(adapter_config["modules_to_save"]) == {"fc_norm", "classifier"}
    weights = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # trained (B starts at zero)
    assert any("classifier" in k for k in weights) and any("fc_norm" in k for k in weights)


def test_merged_model_matches_adapter_and_serves_the_pipeline(lora_run, features):
    from transformers import AutoModelForAudioClassification, pipeline

    out, _, _ = lora_run
    adapter_model = load_lora_model(out).eval()
    merged = AutoModelForAudioClassification.from_pretrained(out / "merged").eval()
    assert type(merged) is CATForAudioClassification
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = adapter_model(input_values=features).logits
        got = merged(input_values=features).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (out / "merged" / "eval_results.json").is_file()
    # cat-hf predict / evaluate take the adapter folder itself as well
    from_adapter, _ = load_classifier(out, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(from_adapter(input_values=features).logits, expected, atol=1e-5, rtol=0)

    scores = pipeline("audio-classification", model=str(out / "merged"))(synth("tone", 0.7, np.random.default_rng(1)))
    assert {s["label"] for s in scores} == set(CLASSES)


def test_base_plus_adapter_with_peft_from_pretrained(lora_run, encoder_dir, features):
    out, _, _ = lora_run
    base = CATForAudioClassification.from_pretrained(encoder_dir, ignore_mismatched_sizes=True, **LABEL_KWARGS).eval()
    with torch.no_grad():
        base_logits = base(input_values=features).logits
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(input_values=features).logits
        reference = load_lora_model(out).eval()(input_values=features).logits
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapter (and head) changed the outputs


def test_merge_from_the_command_line(lora_run, features, tmp_path):
    out, _, _ = lora_run
    target = tmp_path / "merged-cli"
    assert main(["--merge-adapter", str(out), "--output-dir", str(target)]) == 0
    again = CATForAudioClassification.from_pretrained(target).eval()
    first = CATForAudioClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_values=features).logits, first(input_values=features).logits)
    assert merge_lora(out, tmp_path / "merged-py") == tmp_path / "merged-py"


def test_block_layernorms_train_with_the_adapter_and_merge(encoder_dir, features, tmp_path):
    """modules_to_save may name nested modules (PEFT matches name suffixes): tuning the blocks' LayerNorms next to
    LoRA saves them with the adapter, and the merged model still equals the adapter model."""
    model = CATForAudioClassification.from_pretrained(encoder_dir, **LABEL_KWARGS)
    settings = LoraSettings(modules_to_save=["fc_norm", "classifier", "norm1", "norm2"])
    peft_model = add_lora(model, settings, verbose=False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".layers.0.norm1.modules_to_save." in n for n in trainable)
    assert any(".layers.1.norm2.modules_to_save." in n for n in trainable)
    trainable_share = count_parameters(peft_model)[0] / count_parameters(peft_model)[1]
    assert trainable_share < 0.1
    with torch.no_grad():  # move the tuned norms away from their pretrained values
        for name, parameter in peft_model.named_parameters():
            if ".modules_to_save." in name and ".norm" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    from cat_hf.lora import save_lora_adapter

    adapter = save_lora_adapter(peft_model, tmp_path / "adapter")
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("layers.0.norm1" in k for k in saved) and any("layers.1.norm2" in k for k in saved)
    peft_model.eval()
    merged = CATForAudioClassification.from_pretrained(merge_lora(adapter, tmp_path / "merged")).eval()
    with torch.no_grad():
        expected = peft_model(input_values=features).logits
        torch.testing.assert_close(load_lora_model(adapter).eval()(input_values=features).logits, expected,
                                   atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(merged(input_values=features).logits, expected, atol=1e-5, rtol=0)


def test_lora_plus_ratio_speeds_up_only_the_b_matrices():
    from cat_hf.finetune import FinetuneConfig, FinetuneConfigError, build_param_groups

    model = add_lora(CATForAudioClassification(CATConfig.from_preset("cat-tiny", num_hidden_layers=2, num_labels=3)),
                     verbose=False)  # fmt: skip
    groups = build_param_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=1.0, num_layers=2,
                                lora_plus_ratio=16.0)  # fmt: skip
    rate = {name: group["lr"] for group in groups for name in group["names"]}
    b_rates = sorted({round(r, 12) for n, r in rate.items() if ".lora_B." in n})
    others = sorted({round(r, 12) for n, r in rate.items() if ".lora_B." not in n})
    assert b_rates == [1.6e-2] and others == [1e-3]
    with pytest.raises(FinetuneConfigError, match="lora_plus_ratio must be positive"):
        FinetuneConfig(data="x", lora_plus_ratio=0.0).validate()


def test_loading_errors_say_what_is_missing(tmp_path, lora_run):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_lora_model(tmp_path)
    out, _, _ = lora_run
    with pytest.raises(FileNotFoundError, match="base model '/nowhere/cat' does not exist"):
        load_lora_model(out, base_model="/nowhere/cat")


def test_lora_model_trains_under_transformers_trainer(encoder_dir, features, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = CATForAudioClassification.from_pretrained(encoder_dir, ignore_mismatched_sizes=True, **LABEL_KWARGS)
    peft_model = add_lora(model, verbose=False)
    frozen_before = peft_model.get_base_model().cat.layers[0].attention.q_proj.base_layer.weight.detach().clone()
    lora_b = peft_model.get_base_model().cat.layers[0].attention.q_proj.lora_B["default"].weight
    assert torch.count_nonzero(lora_b) == 0

    labels = [0, 1, 2, 0, 1, 2]
    dataset = [{"input_values": features[i], "labels": labels[i]} for i in range(len(labels))]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=3,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             dataloader_num_workers=0)  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset)
    output = trainer.train()
    assert output.global_step == 2 and np.isfinite(output.training_loss)
    assert torch.count_nonzero(lora_b) > 0  # the adapter learned
    torch.testing.assert_close(peft_model.get_base_model().cat.layers[0].attention.q_proj.base_layer.weight,
                               frozen_before, atol=0, rtol=0)  # fmt: skip
