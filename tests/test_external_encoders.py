"""External encoders for Representation Regularization: tiny randomly initialised transformers teachers saved
in a temporary folder (no downloads), the callable path, precomputed lookups, specs and error messages."""

from __future__ import annotations

import logging
import math
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    ASTConfig,
    ASTFeatureExtractor,
    ASTForAudioClassification,
    ASTModel,
    BertConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from cat_hf import CATConfig, CATFeatureExtractor, CATModel
from cat_hf.external_encoders import (
    SUPPORTED_MODEL_TYPES,
    CallableEncoder,
    EmbeddingDimMismatchError,
    ExternalEncoder,
    PrecomputedEmbeddings,
    TransformersAudioEncoder,
    build_external_encoder,
    parse_encoder_spec,
)
from cat_hf.feature_extraction_cat import resample_audio

SR = 16000


def _clips(lengths=(8000, 16000, 12000), seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


W2V_COMMON = {
    "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "conv_dim": (8, 8),
    "conv_kernel": (10, 3), "conv_stride": (5, 2), "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2, "vocab_size": 10,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny teachers of every supported family, saved with their feature extractors like Hub folders."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    paths = {}

    def save(name, model, extractor):
        paths[name] = root / name
        model.save_pretrained(paths[name])
        extractor.save_pretrained(paths[name])

    ast = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    frequency_stride=10, time_stride=10, max_length=100, num_mel_bins=32)
    ast_fe = ASTFeatureExtractor(num_mel_bins=32, max_length=100)
    save("ast", ASTModel(ast), ast_fe)
    save("ast_cls", ASTForAudioClassification(ASTConfig(**{**ast.to_dict(), "num_labels": 7})), ast_fe)
    clap = ClapConfig(
        text_config={"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 32, "projection_dim": 24},
        audio_config={"window_size": 4, "num_mel_bins": 16, "spec_size": 64, "patch_size": 4, "patch_stride": (4, 4),
                          "depths": [1, 1], "num_attention_heads": [2, 2], "hidden_size": 32, "patch_embeds_hidden_size": 16,
                          "enable_fusion": False},
        projection_dim=24,
    )
    # CLAP runs at 48 kHz: our 16 kHz clips must be resampled for it.
    save("clap", ClapModel(clap), ClapFeatureExtractor(feature_size=16, sampling_rate=48000, max_length_s=1))
    # Fused CLAP (clap-htsat-fused): clips longer than the 1 s window become 4 mel crops chosen at random.
    # (The extractor's fusion path hard-codes 64 mel bins.)
    fused = ClapConfig(
        text_config=clap.text_config.to_dict(),
        audio_config={**clap.audio_config.to_dict(), "num_mel_bins": 64, "spec_size": 128, "enable_fusion": True},
        projection_dim=24,
    )
    save("clap_fused", ClapModel(fused), ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=1))
    whisper = WhisperConfig(vocab_size=100, num_mel_bins=16, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                            d_model=16, max_source_positions=100, max_target_positions=20, pad_token_id=1,
                            bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    # chunk_length=2 s -> 200 mel frames -> 100 encoder positions (max_source_positions).
    save("whisper", WhisperModel(whisper), WhisperFeatureExtractor(feature_size=16, chunk_length=2))
    masked_fe = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
    layer_norm = {"feat_extract_norm": "layer", "do_stable_layer_norm": True}
    save("wav2vec2", Wav2Vec2Model(Wav2Vec2Config(**W2V_COMMON, **layer_norm)), masked_fe)
    save("hubert", HubertModel(HubertConfig(**W2V_COMMON, **layer_norm)), masked_fe)
    save("data2vec-audio", Data2VecAudioModel(Data2VecAudioConfig(**W2V_COMMON)), masked_fe)
    # wav2vec2-base style: group-norm feature encoder, extractor without attention mask.
    save("wav2vec2_group", Wav2Vec2Model(Wav2Vec2Config(**W2V_COMMON)), Wav2Vec2FeatureExtractor(return_attention_mask=False))
    cat = CATConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, stem_channels=[8, 16],
                    stem_depths=[1, 1], num_mel_bins=32, decoder_groups=4, rr_embedding_dim=None)
    save("cat", CATModel(cat), CATFeatureExtractor(feature_size=32, num_mel_bins=32, max_length=128, padding="longest"))
    paths["bert"] = root / "bert"
    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(paths["bert"])
    paths["no_extractor"] = root / "no_extractor"
    ASTModel(ast).save_pretrained(paths["no_extractor"])
    return paths


def _assert_frozen(encoder: TransformersAudioEncoder):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


# --------------------------------------------------------------------------------------------------------------
# transformers teachers


def test_ast_poolings_match_direct_forward(models):
    clips = _clips()
    fe = ASTFeatureExtractor.from_pretrained(models["ast"])
    reference = ASTModel.from_pretrained(models["ast"]).eval()
    with torch.no_grad():
        out = reference(**fe(clips, sampling_rate=SR, return_tensors="pt"))

    pooled = TransformersAudioEncoder(models["ast"])  # auto -> pooler_output
    assert (pooled.pooling, pooled.embedding_dim, pooled.sampling_rate) == ("pooler", 32, SR)
    _assert_frozen(pooled)
    emb = pooled(clips)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32 and not emb.requires_grad
    torch.testing.assert_close(emb, out.pooler_output)
    torch.testing.assert_close(pooled(clips), emb, rtol=0, atol=0)  # deterministic

    mean = TransformersAudioEncoder(models["ast"], pooling="mean")(clips)
    torch.testing.assert_close(mean, out.last_hidden_state.mean(dim=1))
    # a (B, N) tensor batch is accepted too
    padded = torch.stack([torch.from_numpy(c[:8000]) for c in clips])
    assert TransformersAudioEncoder(models["ast"], pooling="cls")(padded).shape == (3, 32)


def test_ast_logits_pooling_uses_the_classification_head(models):
    clips = _clips()
    encoder = TransformersAudioEncoder(models["ast_cls"], pooling="logits")
    assert encoder.embedding_dim == 7
    reference = ASTForAudioClassification.from_pretrained(models["ast_cls"]).eval()
    fe = ASTFeatureExtractor.from_pretrained(models["ast_cls"])
    with torch.no_grad():
        logits = reference(**fe(clips, sampling_rate=SR, return_tensors="pt")).logits
    torch.testing.assert_close(encoder(clips), logits)


def test_clap_projected_embedding_at_48khz(models, caplog):
    clips = _clips()
    encoder = TransformersAudioEncoder(models["clap"])
    assert (encoder.pooling, encoder.embedding_dim, encoder.sampling_rate) == ("projection", 24, 48000)
    _assert_frozen(encoder)
    with caplog.at_level(logging.WARNING, logger="cat_hf.external_encoders"):
        emb = encoder(clips)
        again = encoder(clips)
    assert emb.shape == (3, 24)
    resample_logs = [r for r in caplog.records if "resampling" in r.getMessage()]
    assert len(resample_logs) == 1 and "48000" in resample_logs[0].getMessage()
    torch.testing.assert_close(again, emb, rtol=0, atol=0)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))  # get_audio_features is L2-normalised

    # Same as running the model by hand on soxr-resampled 48 kHz audio.
    fe = ClapFeatureExtractor.from_pretrained(models["clap"])
    model = ClapModel.from_pretrained(models["clap"]).eval()
    resampled = [resample_audio(c, SR, 48000) for c in clips]
    assert abs(len(resampled[0]) - 3 * len(clips[0])) <= 1
    inputs = fe(resampled, sampling_rate=48000, return_tensors="pt", truncation="rand_trunc")
    with torch.no_grad():
        expected = model.get_audio_features(input_features=inputs["input_features"]).pooler_output
    torch.testing.assert_close(emb, expected, rtol=1e-4, atol=1e-5)
    # one clip alone gives the same row as inside the batch
    torch.testing.assert_close(encoder([clips[1]])[0], emb[1], rtol=1e-4, atol=1e-5)


def test_fused_clap_random_crops_are_deterministic(models):
    clips = _clips((8000, 40000, 20000))  # 0.5 s (padded), 2.5 s and 1.25 s (cropped: is_longer)
    encoder = TransformersAudioEncoder(models["clap_fused"])
    state = np.random.get_state()
    emb = encoder(clips)
    assert emb.shape == (3, 24)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's numpy RNG is left alone
    torch.testing.assert_close(encoder(clips), emb, rtol=0, atol=0)
    torch.testing.assert_close(encoder(clips[::-1]), emb.flip(0), rtol=1e-5, atol=1e-6)


def test_whisper_mean_ignores_the_30s_padding(models):
    clips = _clips((8000, 20000))
    encoder = TransformersAudioEncoder(models["whisper"])
    assert (encoder.pooling, encoder.embedding_dim) == ("mean", 16)
    _assert_frozen(encoder)
    emb = encoder(clips)
    assert emb.shape == (2, 16)

    fe = WhisperFeatureExtractor.from_pretrained(models["whisper"])
    whisper = WhisperModel.from_pretrained(models["whisper"]).eval()
    with torch.no_grad():
        hidden = whisper.encoder(fe(clips, sampling_rate=SR, return_tensors="pt").input_features).last_hidden_state
    assert hidden.shape[1] == 100  # 2 s of (padded) input
    for row, clip in enumerate(clips):
        real = math.ceil(math.ceil(len(clip) / 160) / 2)  # mel frames, then the stride-2 convolution
        torch.testing.assert_close(emb[row], hidden[row, :real].mean(0))
        assert not torch.allclose(emb[row], hidden[row].mean(0), atol=1e-4)
    torch.testing.assert_close(encoder([clips[0]])[0], emb[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "data2vec-audio", "wav2vec2_group"])
def test_wav2vec2_family_mean_respects_padding(models, family):
    clips = _clips((4000, 8000, 6000, 8000))
    encoder = TransformersAudioEncoder(models[family])
    assert (encoder.pooling, encoder.embedding_dim, encoder.sampling_rate) == ("mean", 16, SR)
    _assert_frozen(encoder)
    batched = encoder(clips)
    assert batched.shape == (4, 16)
    alone = torch.cat([encoder([c]) for c in clips])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(encoder(clips), batched, rtol=0, atol=0)

    # A single clip (no padding) is the plain mean of the last hidden state.
    model_class = {"wav2vec2": Wav2Vec2Model, "hubert": HubertModel, "data2vec-audio": Data2VecAudioModel,
                   "wav2vec2_group": Wav2Vec2Model}[family]
    model = model_class.from_pretrained(models[family]).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(models[family])
    with torch.no_grad():
        hidden = model(fe([clips[0]], sampling_rate=SR, return_tensors="pt").input_values).last_hidden_state
    torch.testing.assert_close(alone[0], hidden[0].mean(0), rtol=1e-4, atol=1e-5)


def test_layer_selects_a_hidden_state(models):
    clips = _clips()
    last = TransformersAudioEncoder(models["hubert"])(clips)
    first = TransformersAudioEncoder(models["hubert"], layer=0)
    assert first.name.endswith(":mean:layer0")
    assert not torch.allclose(first(clips), last)
    # `layer` indexes hidden_states as the model returns them (the last entry precedes the final LayerNorm).
    model = HubertModel.from_pretrained(models["hubert"]).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(models["hubert"])
    with torch.no_grad():
        states = model(fe([clips[0]], sampling_rate=SR, return_tensors="pt").input_values,
                       output_hidden_states=True).hidden_states
    top = TransformersAudioEncoder(models["hubert"], layer=-1)
    torch.testing.assert_close(top([clips[0]])[0], states[-1][0].mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first([clips[0]])[0], states[0][0].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="out of range.*2 hidden states"):
        TransformersAudioEncoder(models["hubert"], layer=5)
    with pytest.raises(ValueError, match="only applies to the 'mean'/'cls' poolings"):
        TransformersAudioEncoder(models["ast"], pooling="pooler", layer=1)


def test_cat_teacher_poolings_and_padding(models):
    clips = _clips()
    pooled = TransformersAudioEncoder(models["cat"])
    assert (pooled.pooling, pooled.embedding_dim) == ("pooler", 32)
    _assert_frozen(pooled)
    batched = pooled(clips)
    torch.testing.assert_close(batched, torch.cat([pooled([c]) for c in clips]), rtol=1e-4, atol=1e-5)
    fe = CATFeatureExtractor.from_pretrained(models["cat"])
    model = CATModel.from_pretrained(models["cat"]).eval()
    with torch.no_grad():
        out = model(**fe([clips[1]], sampling_rate=SR, return_tensors="pt"))
    torch.testing.assert_close(batched[1], out.pooler_output[0], rtol=1e-4, atol=1e-5)

    mean = TransformersAudioEncoder(models["cat"], pooling="mean")
    torch.testing.assert_close(mean([clips[1]])[0], out.last_hidden_state[0, 1:].mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean(clips), torch.cat([mean([c]) for c in clips]), rtol=1e-4, atol=1e-5)


def test_transformers_encoder_errors(models, tmp_path):
    with pytest.raises(ValueError) as err:
        TransformersAudioEncoder(models["bert"])
    assert "'bert'" in str(err.value)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(err.value)
    with pytest.raises(ValueError, match=r"pooling='cls' is not available for 'clap'.*projection"):
        TransformersAudioEncoder(models["clap"], pooling="cls")
    with pytest.raises(ValueError, match="feature extractor"):
        TransformersAudioEncoder(models["no_extractor"])
    with pytest.raises(ValueError, match="neither a local model folder"):
        TransformersAudioEncoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="Unknown dtype"):
        TransformersAudioEncoder(models["ast"], dtype="float8")


def test_waveform_validation(models):
    encoder = TransformersAudioEncoder(models["hubert"])
    with pytest.raises(ValueError, match="wrap a single clip in a list"):
        encoder(np.zeros(16000, dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        encoder([np.zeros((2, 16000), dtype=np.float32)])
    with pytest.raises(ValueError, match="empty"):
        encoder([np.zeros(0, dtype=np.float32)])


def test_check_embedding_dim_names_both_sizes_and_the_field(models):
    encoder = TransformersAudioEncoder(models["clap"])
    encoder.check_embedding_dim(24)
    config = CATConfig(rr_embedding_dim=512)
    with pytest.raises(EmbeddingDimMismatchError) as err:
        encoder.check_embedding_dim(config.rr_embedding_dim)
    message = str(err.value)
    assert "24" in message and "512" in message and "rr_embedding_dim: 24" in message
    assert "--set model.rr_embedding_dim=24" in message  # the command line's spelling
    with pytest.raises(EmbeddingDimMismatchError, match="rr_embedding_dim=None"):
        encoder.check_embedding_dim(None)


# --------------------------------------------------------------------------------------------------------------
# callables


def test_callable_encoder_list_input_and_resampling():
    seen = []

    def stats(batch):
        seen.append([len(x) for x in batch])
        return np.stack([[x.mean(), x.std(), len(x)] for x in batch])

    encoder = CallableEncoder(stats, embedding_dim=3, sampling_rate=8000, name="stats")
    assert isinstance(encoder, ExternalEncoder) and encoder.requires_audio
    clips = _clips((16000, 8000))
    out = encoder(clips)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    assert seen == [[8000, 4000]]  # resampled from 16 kHz to the callable's 8 kHz
    assert out[:, 2].tolist() == [8000.0, 4000.0]


def test_callable_encoder_tensor_input_and_module():
    class Mean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(2))

        def forward(self, batch):
            return batch.abs().sum(dim=1, keepdim=True) * self.scale

    module = Mean().train()
    encoder = CallableEncoder(module, 2, input_format="tensor").to("cpu")
    assert not module.training and not module.scale.requires_grad
    clips = [np.ones(4, dtype=np.float32), np.ones(2, dtype=np.float32)]
    out = encoder(clips)  # zero-padded (B, N) tensor
    torch.testing.assert_close(out, torch.tensor([[4.0, 4.0], [2.0, 2.0]]))
    assert not out.requires_grad


def test_callable_encoder_checks_the_output_shape():
    encoder = CallableEncoder(lambda batch: np.zeros((len(batch), 5)), embedding_dim=4, name="five")
    with pytest.raises(ValueError, match=r"'five' returned shape \(2, 5\).*expected \(2, 4\)"):
        encoder(_clips((100, 200)))
    nan = CallableEncoder(lambda batch: np.full((len(batch), 4), np.nan), embedding_dim=4)
    with pytest.raises(ValueError, match="NaN"):
        nan(_clips((100,)))
    with pytest.raises(ValueError, match="positive"):
        CallableEncoder(lambda b: b, embedding_dim=0)


# --------------------------------------------------------------------------------------------------------------
# precomputed embeddings


def test_precomputed_from_array_and_dataset_column():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    encoder = PrecomputedEmbeddings(table)
    assert not encoder.requires_audio and encoder.embedding_dim == 3 and len(encoder) == 4
    torch.testing.assert_close(encoder(indices=[2, 0]), torch.tensor([[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]))
    torch.testing.assert_close(encoder(indices=torch.tensor([3])), torch.tensor([[9.0, 10.0, 11.0]]))
    with pytest.raises(ValueError, match="indices="):
        encoder(_clips((100,)))
    with pytest.raises(IndexError, match="outside the 4 precomputed embeddings"):
        encoder(indices=[4])

    dataset = datasets.Dataset.from_dict({"audio": ["a", "b", "c", "d"], "clap_emb": table.tolist()})
    column = build_external_encoder("column:clap_emb", dataset=dataset)
    assert column.name == "column:clap_emb" and column.embedding_dim == 3
    torch.testing.assert_close(column(indices=[1, 3]), torch.tensor([[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]))
    loaded = PrecomputedEmbeddings(dataset.with_format("numpy")["clap_emb"])
    torch.testing.assert_close(loaded(indices=[1]), torch.tensor([[3.0, 4.0, 5.0]]))
    by_name = PrecomputedEmbeddings("clap_emb", dataset=dataset)
    torch.testing.assert_close(by_name(indices=[2]), torch.tensor([[6.0, 7.0, 8.0]]))
    with pytest.raises(ValueError, match="neither a column of the dataset"):
        PrecomputedEmbeddings("clap", dataset=dataset)
    with pytest.raises(ValueError, match="no column 'nope'"):
        build_external_encoder("column:nope", dataset=dataset)
    with pytest.raises(ValueError, match="no dataset was given"):
        build_external_encoder("column:clap_emb")


# --------------------------------------------------------------------------------------------------------------
# specs


def test_parse_encoder_spec():
    assert parse_encoder_spec("hf:org/model?pooling=mean&layer=-2") == {
        "type": "hf", "name_or_path": "org/model", "pooling": "mean", "layer": -2}
    assert parse_encoder_spec("python:pkg.mod:fn?embedding_dim=512") == {
        "type": "python", "target": "pkg.mod:fn", "embedding_dim": 512}
    assert parse_encoder_spec({"type": "cache", "path": "/x"}) == {"type": "cache", "path": "/x"}
    for bad in ("clap", "foo:bar", "hf:", {"name_or_path": "x"}):
        with pytest.raises(ValueError, match="hf:<hub name or folder>"):
            parse_encoder_spec(bad)


def test_build_external_encoder_specs(models, tmp_path, monkeypatch):
    hf = build_external_encoder(f"hf:{models['hubert']}?pooling=mean&layer=0")
    assert isinstance(hf, TransformersAudioEncoder) and hf.layer == 0
    as_dict = build_external_encoder({"type": "hf", "name_or_path": str(models["ast"]), "pooling": "mean"})
    assert as_dict.pooling == "mean"
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['polling'\]"):
        build_external_encoder(f"hf:{models['ast']}?polling=mean")

    source = tmp_path / "my_encoders.py"
    source.write_text(
        "import numpy as np\n"
        "def energy(batch):\n"
        "    return np.stack([[float((x ** 2).mean()), float(len(x))] for x in batch])\n"
        "def tagged(batch):\n"
        "    return np.ones((len(batch), 3))\n"
        "tagged.embedding_dim = 3\n"
        "tagged.sampling_rate = 8000\n"
        "from cat_hf.external_encoders import CallableEncoder\n"
        "class Ones(CallableEncoder):\n"
        "    def __init__(self, dim=2):\n"
        "        super().__init__(lambda batch: np.ones((len(batch), dim)), dim, name='ones')\n"
        "INSTANCE = Ones(5)\n"
    )
    from_file = build_external_encoder(f"python:{source}:energy?embedding_dim=2")
    assert isinstance(from_file, CallableEncoder) and from_file.embedding_dim == 2
    assert from_file(_clips((1600,)))[0, 1].item() == 1600.0

    monkeypatch.syspath_prepend(str(tmp_path))
    tagged = build_external_encoder("python:my_encoders:tagged")
    assert (tagged.embedding_dim, tagged.sampling_rate) == (3, 8000)
    assert tagged(_clips((1600,)))[0].tolist() == [1.0, 1.0, 1.0]
    assert build_external_encoder("python:my_encoders:Ones?dim=3")(_clips((100,))).shape == (1, 3)
    assert build_external_encoder("python:my_encoders:INSTANCE").embedding_dim == 5
    with pytest.raises(ValueError, match="embedding_dim=D"):
        build_external_encoder("python:my_encoders:energy")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        build_external_encoder("python:my_encoders:nothing?embedding_dim=2")
    with pytest.raises(ValueError, match="Cannot import 'no_such_module_xyz'"):
        build_external_encoder("python:no_such_module_xyz:fn?embedding_dim=2")
    sys.modules.pop("my_encoders", None)
