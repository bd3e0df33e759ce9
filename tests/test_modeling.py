"""Behaviour of the CAT encoder and classifier on small random models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForAudioClassification, AutoProcessor

from cat_hf import CATConfig, CATFeatureExtractor, CATForAudioClassification, CATForPreTraining, CATModel


def small_config(**overrides) -> CATConfig:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, stem_channels=[16, 32],
                stem_depths=[1, 1], max_time_patches=64, decoder_groups=8, rr_embedding_dim=32)
    return CATConfig(**{**base, **overrides})


def random_model(cls=CATModel, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(small_config(**overrides)).eval()


# -- configuration ---------------------------------------------------------------------------------------------


def test_presets_match_the_paper():
    base = CATConfig.from_preset("cat-base")
    assert (base.hidden_size, base.num_attention_heads, base.num_hidden_layers, base.stem_type) == (768, 12, 11, "multires")
    with torch.device("meta"):
        params = sum(p.numel() for p in CATModel(base).parameters())
    assert abs(params / 1e6 - 88.8) < 0.1  # the paper's 88.8 M
    for name in ("cat-tiny", "cat-small", "cat-large"):
        assert CATConfig.from_preset(name).model_type == "cat"
    with pytest.raises(ValueError, match="Unknown CAT preset 'cat-huge'"):
        CATConfig.from_preset("cat-huge")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "not divisible by num_attention_heads"),
        (dict(stem_channels=[16, 32, 64]), "give one entry per stage except the last"),
        (dict(stem_depths=[1]), "stem_depths"),
        (dict(stem_strides=[4, 2, 4]), "must multiply to patch_size"),
        (dict(stem_type="resnet"), "stem_type='resnet' is not supported"),
        (dict(pooling="max"), "pooling='max' is not supported"),
        (dict(average_top_k_layers=5), "average_top_k_layers"),
        (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
        (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer, got -1"),
        (dict(hidden_size=192.0), r"hidden_size must be a positive integer, got 192.0 \(float\)"),
        (dict(max_time_patches="64"), r"max_time_patches must be a positive integer, got '64' \(str\)"),
        (dict(problem_type="single_label"), "problem_type='single_label' is not one of"),
    ],
)
def test_inconsistent_config_is_rejected(overrides, message):
    with pytest.raises(Exception, match=message):
        small_config(**overrides)


def test_config_round_trip(tmp_path):
    config = small_config(stem_type="patch", pooling="mean")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CATConfig)
    assert loaded.to_dict()["stem_channels"] == [16, 32] and loaded.pooling == "mean" and loaded.stem_type == "patch"


# -- encoder ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem_type", ["multires", "patch"])
def test_output_shapes_and_lengths(stem_type):
    model = random_model(stem_type=stem_type)
    for frames in (16, 160, 300, 1024):
        with torch.no_grad():
            out = model(torch.randn(2, frames, 128), output_hidden_states=True, output_attentions=True)
        tokens = 1 + (frames // 16) * 8
        assert out.last_hidden_state.shape == (2, tokens, 64)
        assert out.pooler_output.shape == (2, 64)
        assert len(out.hidden_states) == 3 and len(out.attentions) == 2
        assert out.attentions[0].shape == (2, 4, tokens, tokens)
    # (B, 1, T, F) is accepted too, as the original takes it.
    x = torch.randn(1, 64, 128)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x[:, None]).last_hidden_state)


def test_bad_lengths_get_clear_errors():
    model = random_model()
    with pytest.raises(ValueError, match="fewer than one patch"):
        model(torch.randn(1, 15, 128))
    with pytest.raises(ValueError, match="positional table covers at most 1024 frames"):
        model(torch.randn(1, 1040, 128))
    with pytest.raises(ValueError, match="mel bins"):
        model(torch.randn(1, 64, 64))
    with pytest.raises(ValueError, match="input_values must have shape"):
        model(torch.randn(64, 128))


def test_bad_inputs_and_masks_get_clear_errors():
    model = random_model()
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray.*return_tensors='pt'"):
        model(np.zeros((1, 64, 128), dtype=np.float32))
    x, mask = torch.randn(2, 64, 128), torch.ones(2, 64, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 48\), but input_values has 2 clips of 64"):
        model(x, attention_mask=mask[:, :48])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 64\)"):
        model(x, attention_mask=mask[:1])
    left_padded = mask.clone()
    left_padded[1, :20] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have padding before real frames.*right-padded"):
        model(x, attention_mask=left_padded)
    right_padded = mask.clone().bool()
    right_padded[1, 44:] = False
    model(x, attention_mask=right_padded)  # bool masks are accepted


def test_trailing_frames_follow_the_original_rule():
    """floor(T/16) tokens; with the multi-resolution stem the T mod 16 tail still influences tokens (as in the
    original), with the patch stem it is ignored."""
    for stem_type, influences in (("multires", True), ("patch", False)):
        model = random_model(stem_type=stem_type)
        x = torch.randn(1, 300, 128)
        y = x.clone()
        y[:, 288:] += 1.0
        with torch.no_grad():
            diff = (model(x).last_hidden_state - model(y).last_hidden_state).abs().max().item()
        assert (diff > 1e-4) == influences


def test_sdpa_and_eager_attention_agree():
    model = random_model()
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        sdpa = model(x).last_hidden_state
        eager = model(x, output_attentions=True)
    assert torch.allclose(sdpa, eager.last_hidden_state, atol=1e-5)
    assert torch.allclose(eager.attentions[0].sum(-1), torch.ones(1), atol=1e-5)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        assert torch.allclose(model(x).last_hidden_state, sdpa, atol=1e-5)


def test_set_attn_implementation_switches_the_registry_function():
    """Attention goes through transformers' registry: `set_attn_implementation` switches every block, and eager,
    sdpa and an implementation registered by the user (with its mask format) all give the same output, masked
    batch included."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model = random_model()
    x, mask = torch.randn(2, 64, 128), torch.ones(2, 64, dtype=torch.long)
    mask[1, 40:] = 0
    calls = []

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("cat_test_counting", counting_sdpa)
    AttentionMaskInterface.register("cat_test_counting", sdpa_mask)
    with torch.no_grad():
        reference = model(x, attention_mask=mask).last_hidden_state
        for implementation in ("eager", "cat_test_counting", "sdpa"):
            model.set_attn_implementation(implementation)
            assert model.config._attn_implementation == implementation
            torch.testing.assert_close(model(x, attention_mask=mask).last_hidden_state, reference, atol=1e-5, rtol=0)
    assert len(calls) == model.config.num_hidden_layers
    # Probabilities come from the eager function whatever the implementation (the fused kernels give none).
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 33, 33)
    assert out.attentions[0][1, :, :, 1 + 3 * 8:].abs().max() == 0  # padded patches get no attention


def test_hidden_act_is_read_by_the_blocks():
    x = torch.randn(1, 64, 128)
    gelu, relu = random_model(), random_model(hidden_act="relu")
    assert torch.equal(gelu.layers[0].mlp.act(x), F.gelu(x))  # exact GELU, as every checkpoint
    assert torch.equal(relu.layers[0].mlp.act(x), F.relu(x))
    with torch.no_grad():
        assert not torch.allclose(gelu(x).last_hidden_state, relu(x).last_hidden_state, atol=1e-3)
    with pytest.raises(Exception, match="hidden_act='swishy' is not an activation of transformers' ACT2FN"):
        small_config(hidden_act="swishy")


@pytest.mark.parametrize("stem_type", ["multires", "patch"])
def test_left_padding_by_whole_patches_is_exact(stem_type):
    """Left padding by whole patches gives the clip's own output (its patches keep their positions); padding by
    part of a patch, or padding between real frames, is refused with the reason."""
    model = random_model(stem_type=stem_type, pooling="mean")
    clip = torch.randn(1, 48, 128)
    batch = torch.cat([torch.randn(1, 32, 128), clip], dim=1).repeat(2, 1, 1)
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[0, :32] = 0  # row 0: two padding patches, then the clip; row 1: all real
    with torch.no_grad():
        alone = model(clip)
        padded = model(batch, attention_mask=mask)
    clip_tokens = padded.last_hidden_state[0, 1 + 2 * 8:]  # after CLS and two padding patches of 8 tokens
    torch.testing.assert_close(clip_tokens, alone.last_hidden_state[0, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.pooler_output[0], alone.pooler_output[0], atol=1e-5, rtol=0)
    assert padded.token_padding_mask[0, 1:17].all() and not padded.token_padding_mask[0, 17:].any()
    gap = mask.clone()
    gap[1, 40:50] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have padding between real frames"):
        model(batch, attention_mask=gap)
    part = mask.clone()
    part[0, :40] = 0
    with pytest.raises(ValueError, match=r"rows \[0\] .* not a whole number of patches \(40 frames, not a multiple"):
        model(batch, attention_mask=part)


def test_non_binary_masks_and_non_finite_inputs_are_errors():
    model = random_model()
    x, mask = torch.randn(2, 64, 128), torch.ones(2, 64, dtype=torch.long)
    two = mask.clone()
    two[1, :10] = 2
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] hold 2: it must be 1 for real frames and 0"):
        model(x, attention_mask=two)
    with pytest.raises(ValueError, match=r"attention_mask rows \[0, 1\] hold 0.5"):
        model(x, attention_mask=torch.full((2, 64), 0.5))
    model(x, attention_mask=mask.float())  # 0.0 / 1.0 floats are a valid mask
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 5, 7] = bad
        with pytest.raises(ValueError, match=r"input_values rows \[1\] hold NaN or infinite values"):
            model(y)


def test_recorded_outputs_and_tuples():
    """hidden_states / attentions / mlp_outputs are recorded by transformers' output capture; return_dict=False
    gives the same tensors as a tuple, in field order."""
    model = random_model()
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_mlp_outputs=True)
        as_tuple = model(x, output_hidden_states=True, output_mlp_outputs=True, return_dict=False)
        plain = model(x)
    assert len(out.hidden_states) == 3 and len(out.mlp_outputs) == 2 and out.attentions is None
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert plain.hidden_states is None and plain.mlp_outputs is None
    # The MLP output is the residual branch of the second LayerNorm: LN2(x + mlp) is the block's output.
    layer = model.layers[1]
    torch.testing.assert_close(layer.norm2(layer.norm1(out.hidden_states[1] + layer.attention(out.hidden_states[1])[0])
                                           + out.mlp_outputs[1]), out.hidden_states[2], atol=1e-5, rtol=0)
    assert len(as_tuple) == 4 and torch.equal(as_tuple[0], out.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple[2], out.hidden_states))


@pytest.mark.parametrize("stem_type", ["multires", "patch"])
@pytest.mark.parametrize("pooling", ["cls", "mean", "lin_softmax"])
def test_padded_batch_equals_single_clips(stem_type, pooling):
    """A clip gives the same outputs alone and padded inside a batch (attention_mask from the extractor)."""
    model = random_model(stem_type=stem_type, pooling=pooling)
    extractor = CATFeatureExtractor(max_length=1024)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 7000, 3100)]
    batch = extractor(clips, sampling_rate=16000, padding="longest", return_tensors="pt")
    assert batch["attention_mask"].shape == batch["input_values"].shape[:2]
    with torch.no_grad():
        together = model(**batch)
        for i, clip in enumerate(clips):
            alone = extractor([clip], sampling_rate=16000, padding="longest", return_tensors="pt")
            single = model(**alone)
            tokens = single.last_hidden_state.shape[1]
            assert torch.allclose(together.last_hidden_state[i, :tokens], single.last_hidden_state[0], atol=1e-5)
            assert torch.allclose(together.pooler_output[i], single.pooler_output[0], atol=1e-5)
            assert together.token_padding_mask[i, tokens:].all() and not together.token_padding_mask[i, :tokens].any()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = random_model(cls=CATForAudioClassification, num_labels=3)
    model.train()
    x = torch.randn(2, 64, 128)
    labels = torch.tensor([0, 2])
    block_runs = []
    model.cat.layers[0].attention.q_proj.register_forward_pre_hook(lambda *_: block_runs.append(1))

    def grads():
        model.zero_grad()
        block_runs.clear()
        model(x, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    assert len(block_runs) == 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert len(block_runs) == 2  # the block ran again in the backward pass
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_drop_path_is_active_only_in_training():
    model = random_model(drop_path_rate=0.5)
    x = torch.randn(4, 64, 128)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)
        model.train()
        torch.manual_seed(1)
        a = model(x).last_hidden_state
        torch.manual_seed(2)
        b = model(x).last_hidden_state
    assert not torch.allclose(a, b)


# -- classification ----------------------------------------------------------------------------------------------


def test_classification_losses_follow_problem_type():
    x = torch.randn(3, 64, 128)
    single = random_model(CATForAudioClassification, num_labels=4, problem_type="single_label_classification")
    labels = torch.tensor([0, 3, 1])
    out = single(x, labels=labels)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels), atol=1e-6)

    multi = random_model(CATForAudioClassification, num_labels=4, problem_type="multi_label_classification")
    tags = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    out = multi(x, labels=tags)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(out.logits, tags), atol=1e-6)

    regression = random_model(CATForAudioClassification, num_labels=1)
    target = torch.tensor([0.5, -1.0, 2.0])
    out = regression(x, labels=target)
    assert regression.config.problem_type == "regression"
    assert torch.allclose(out.loss, F.mse_loss(out.logits.squeeze(-1), target), atol=1e-6)

    inferred = random_model(CATForAudioClassification, num_labels=4)
    inferred(x, labels=labels, output_hidden_states=False, some_peft_kwarg=None)  # extra kwargs are ignored
    assert inferred.config.problem_type == "single_label_classification"


def test_mean_pooling_head_and_no_fc_norm():
    model = random_model(CATForAudioClassification, num_labels=2, pooling="mean", use_fc_norm=False)
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        hidden = model.cat(x).last_hidden_state
        expected = model.classifier(hidden[:, 1:].mean(1))
        assert torch.allclose(model(x).logits, expected, atol=1e-6)


def test_linear_softmax_pooling_follows_the_original_formula():
    """LIN_SOFTMAX of the original finetuning model, written out here as it is there: on the patch tokens,
    logsigmoid, logsumexp(2x) - logsumexp(x + 1e-6) over tokens, clamp at 0, then x - log(-expm1(x))."""
    model = random_model(CATForAudioClassification, num_labels=2, pooling="lin_softmax")
    x = torch.randn(2, 64, 128)
    with torch.no_grad():
        patches = model.cat(x).last_hidden_state[:, 1:]
        log_p = torch.nn.functional.logsigmoid(patches)
        pooled = (torch.logsumexp(log_p + log_p, dim=1) - torch.logsumexp(log_p + 1e-6, dim=1)).clamp(max=0)
        pooled = torch.nan_to_num(pooled - torch.log(-torch.expm1(pooled)), nan=0, posinf=0, neginf=0)
        expected = model.classifier(model.fc_norm(pooled))
        torch.testing.assert_close(model(x).logits, expected, atol=1e-6, rtol=0)
        # It is the logit of sum(p^2) / sum(p), p = sigmoid(token): a confident token dominates the clip.
        p = patches.sigmoid()
        torch.testing.assert_close(pooled.sigmoid(), (p * p).sum(1) / (p.sum(1) * math.exp(1e-6)), atol=1e-5, rtol=1e-4)


# -- saving, Auto classes, remote code -----------------------------------------------------------------------------


def test_save_pretrained_writes_safetensors_auto_map_and_sources(tmp_path):
    model = random_model(CATForAudioClassification, num_labels=2)
    model.save_pretrained(tmp_path)
    CATFeatureExtractor().save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "configuration_cat.py",
            "modeling_cat.py", "feature_extraction_cat.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForAudioClassification"] == "modeling_cat.CATForAudioClassification"
    assert config["auto_map"]["AutoModel"] == "modeling_cat.CATModel"
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["auto_map"]["AutoFeatureExtractor"] == \
        "feature_extraction_cat.CATFeatureExtractor"
    reloaded = AutoModelForAudioClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 64, 128)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    encoder = AutoModel.from_pretrained(tmp_path)
    assert isinstance(encoder, CATModel)


REMOTE_CODE_SCRIPT = r"""
import sys, importlib.abc
class BlockCatHf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "cat_hf" or name.startswith("cat_hf."):
            raise ImportError("cat_hf is blocked in this test")
sys.meta_path.insert(0, BlockCatHf())
import numpy as np, torch
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification
folder = sys.argv[1]
try:
    import cat_hf
    raise SystemExit("cat_hf should not be importable here")
except ImportError:
    pass
extractor = AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForAudioClassification.from_pretrained(folder, trust_remote_code=True).eval()
encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
assert type(model).__name__ == "CATForAudioClassification" and "cat_hf" not in type(model).__module__
inputs = extractor([np.sin(np.arange(16000) * 0.05).astype(np.float32)], sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    print(repr(model(**inputs).logits.tolist()))
"""


def test_remote_code_loads_without_cat_hf(tmp_path, tiny_classifier_dir):
    import subprocess
    import sys

    from transformers import AutoFeatureExtractor

    script = tmp_path / "remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, str(script), str(tiny_classifier_dir)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote_logits = torch.tensor(eval(result.stdout.strip().splitlines()[-1]))
    model = AutoModelForAudioClassification.from_pretrained(tiny_classifier_dir).eval()
    extractor = AutoFeatureExtractor.from_pretrained(tiny_classifier_dir)
    inputs = extractor([np.sin(np.arange(16000) * 0.05).astype(np.float32)], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, remote_logits, atol=1e-6)


def test_auto_processor_gives_the_feature_extractor_without_asking(tiny_classifier_dir, monkeypatch):
    """CAT has no tokenizer, so its processor is the feature extractor; no remote-code question for local folders."""
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("AutoProcessor asked whether to trust remote code"))
    assert isinstance(AutoProcessor.from_pretrained(tiny_classifier_dir), CATFeatureExtractor)


# -- pretraining model -------------------------------------------------------------------------------------------


def test_pretraining_builds_its_own_masks_at_any_length():
    model = random_model(CATForPreTraining, clone_batch=2)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for frames in (128, 304, 512):
        out = model(torch.randn(2, frames, 128), rr_embeddings=torch.randn(2, 32), generator=generator)
        patches = frames // 16 * 8
        kept = int(patches * (1 - 0.8))
        assert out.mask.shape == (4, patches)
        assert torch.all(out.mask.sum(1) == patches - kept)
        assert out.student_hidden_state.shape == (4, 1 + kept, 64)
        assert torch.isfinite(out.loss) and out.rr_loss is not None
    with pytest.raises(ValueError, match="multiple of 16 frames"):
        model(torch.randn(1, 300, 128))
    with pytest.raises(ValueError, match="rr_embedding_dim"):
        model(torch.randn(1, 64, 128), rr_embeddings=torch.randn(1, 7))


def test_masked_stem_does_not_leak_from_masked_patches():
    """Changing the input under masked patches leaves the student's visible tokens unchanged."""
    model = random_model(CATForPreTraining, clone_batch=1)
    model.train()
    model.config.mask_noise_std = 0.0
    mask = model.make_mask(1, (8, 8), generator=torch.Generator().manual_seed(3))
    x = torch.randn(1, 128, 128)
    y = x.clone()
    masked_patch_frames = mask.view(8, 8).bool().repeat_interleave(16, 0).repeat_interleave(16, 1)
    y[0][masked_patch_frames] += torch.randn(int(masked_patch_frames.sum()))
    with torch.no_grad():
        a = model(x, mask=mask).student_hidden_state
        b = model(y, mask=mask).student_hidden_state
    assert torch.allclose(a, b, atol=1e-5)


def test_inverse_block_mask_is_deterministic_and_rectangular():
    from cat_hf import compute_inverse_block_mask

    a = compute_inverse_block_mask(8, (64, 8), generator=torch.Generator().manual_seed(5))
    b = compute_inverse_block_mask(8, (64, 8), generator=torch.Generator().manual_seed(5))
    c = compute_inverse_block_mask(8, (64, 8), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a.sum(1) == 410)  # 512 patches, 102 kept, as in the original
    # Kept tokens come in blocks: almost every kept token has a kept 8-neighbour (scattered picks would not).
    keep = (1 - a).view(8, 1, 64, 8)
    kept_neighbours = F.conv2d(F.pad(keep, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3)) - keep
    assert ((kept_neighbours > 0) * keep).sum() > 0.8 * keep.sum()


def test_teacher_ema_update_and_schedule():
    model = random_model(CATForPreTraining)
    assert model.teacher_decay(0) == pytest.approx(0.9998)
    assert model.teacher_decay(50_000) == pytest.approx((0.9998 + 0.99999) / 2)
    assert model.teacher_decay(10**6) == pytest.approx(0.99999)
    student_before = model.cat.layers[0].mlp.fc1.weight.detach().clone()
    teacher_before = model.teacher.layers[0].mlp.fc1.weight.detach().clone()
    assert torch.equal(student_before, teacher_before)
    with torch.no_grad():
        model.cat.layers[0].mlp.fc1.weight.add_(1.0)
    decay = model.update_teacher(0)
    expected = decay * teacher_before + (1 - decay) * (student_before + 1.0)
    assert torch.allclose(model.teacher.layers[0].mlp.fc1.weight, expected, atol=1e-7)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_pretraining_model_save_round_trip(tmp_path):
    model = random_model(CATForPreTraining)
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path)
    loaded = CATForPreTraining.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # The student loads as an encoder with nothing unexpected reported (teacher, decoder, RR projector are left out).
    encoder, info = CATModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert torch.equal(encoder.layers[0].mlp.fc1.weight, model.cat.layers[0].mlp.fc1.weight)
    # An encoder-only folder gives a pretraining model whose teacher starts as the student.
    encoder_dir = tmp_path / "encoder"
    model.cat.save_pretrained(encoder_dir)
    continued = CATForPreTraining.from_pretrained(encoder_dir)
    for a, b in zip(continued.cat.parameters(), continued.teacher.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("stem_type", "stages"),
    [("multires", {"stem_depths": [2, 1]}), ("patch", {}),
     # the authors' conv_option 1 (one strided convolution, LayerNorm, Linear) and 5 (four stages)
     ("multires", {"stem_strides": [16], "stem_channels": [], "stem_depths": []}),
     ("multires", {"stem_strides": [2, 2, 2, 2], "stem_channels": [8, 16, 32], "stem_depths": [1, 1, 1]})],
)
def test_visible_patch_path_equals_dense_masked_stem(stem_type, stages):
    """The sparse path of pretraining (only kept patches computed) equals the dense stem with the keep map."""
    model = random_model(stem_type=stem_type, **stages)
    mask = CATForPreTraining.make_mask(random_model(CATForPreTraining, clone_batch=1), 3, (10, 8),
                                       generator=torch.Generator().manual_seed(0))
    kept = int((mask[0] == 0).sum())
    assert torch.all((mask == 0).sum(1) == kept)
    kept_ids = torch.sort(mask, dim=1, stable=True).indices[:, :kept]
    x = torch.randn(3, 1, 160, 128)
    with torch.no_grad():
        sparse = model.embeddings.visible_patch_tokens(x, kept_ids)
        keep = (1 - mask).view(3, 10, 8) if stem_type == "multires" else None
        dense = model.embeddings.patch_tokens(x, keep)
        dense = torch.gather(dense, 1, kept_ids[..., None].expand(-1, -1, dense.shape[-1]))
    assert torch.allclose(sparse, dense, atol=1e-5)


def test_pretraining_forward_and_backward_under_bf16_autocast():
    model = random_model(CATForPreTraining, clone_batch=2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 64, 128), rr_embeddings=torch.randn(2, 32))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.cat.layers[0].mlp.fc1.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_utterance_loss_uses_the_last_extra_token():
    """The original regresses x[:, extra_tokens - 1] onto the mean target; with two extra tokens that is token 1."""
    model = random_model(CATForPreTraining, num_extra_tokens=2, clone_batch=2).train()
    out = model(torch.randn(2, 64, 128), generator=torch.Generator().manual_seed(0))
    target = out.targets.repeat_interleave(2, dim=0).mean(dim=1)
    token = lambda i: ((out.student_hidden_state[:, i] - target) ** 2 / math.sqrt(target.shape[-1])).sum()  # noqa: E731
    assert torch.allclose(out.utterance_loss, token(1), rtol=1e-5)
    assert not torch.allclose(out.utterance_loss, token(0), rtol=1e-4)
