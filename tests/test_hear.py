"""cat_hf.hear against the HEAR API's rules, re-checked here as hear-validator checks them (hear-validator itself
needs tensorflow: `hear-validator cat_hf.hear -m FOLDER` where it installs). The rules are those of
hearbenchmark/hear-validator 2021.0.6 (validate.py), for a torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cat_hf.hear as hear
from cat_hf import CATConfig, CATFeatureExtractor, CATForPreTraining

ACCEPTABLE_SAMPLE_RATES = (16000, 22050, 44100, 48000)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A pretraining checkpoint folder (encoder + teacher + decoder), as users get from `cat-hf pretrain`."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hear-cat")
    config = CATConfig.from_preset("cat-tiny", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   stem_channels=[8, 16], decoder_layers=1)
    CATForPreTraining(config).save_pretrained(path)
    CATFeatureExtractor().save_pretrained(path)
    return path


def check_timestamp_embeddings(model, num_audio: int, length: float) -> None:
    """hear-validator's _check_timestamp_embeddings (errors only; its warnings are asserted where we meet them)."""
    audio = torch.rand((num_audio, int(length * model.sample_rate))) * 2 - 1.0
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32
    embeddings, timestamps = embeddings.detach().cpu().numpy(), timestamps.detach().cpu().numpy()
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[0] == num_audio and embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == model.timestamp_embedding_size
    assert timestamps.shape[1] > 1
    diff = np.diff(timestamps)
    avg = np.mean(diff)
    assert np.max(np.abs(diff - avg)) <= 1  # regular intervals
    assert np.max(diff) <= 50.0  # else a warning: HEAR asks for <= 50 ms
    assert np.min(timestamps) <= avg  # else a warning: "timestamps begin at ..."
    assert np.max(timestamps) >= 1000 * length - 2 * avg  # else an error: no embeddings for the end
    assert np.max(timestamps) >= 1000 * length - avg and np.max(timestamps) >= 1000 * length - 50  # else a warning
    assert np.max(timestamps) <= 1000 * length  # else an error: past the end


def test_hear_api_rules(folder):
    model = hear.load_model(str(folder))
    assert isinstance(model, torch.nn.Module)
    model.to("cpu")  # the validator moves the model to its device
    assert model.sample_rate in ACCEPTABLE_SAMPLE_RATES
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    for num_audio, length in ((2, 1.07), (2, 1.98), (2, 4.0), (3, 2.0)):
        check_timestamp_embeddings(model, num_audio, length)
    for num_audio, length in ((4, 2.74), (3, 3.74)):
        audio = torch.rand((num_audio, int(length * model.sample_rate))) * 2 - 1.0
        scene = hear.get_scene_embeddings(audio, model)
        assert scene.dtype == torch.float32 and scene.ndim == 2
        assert scene.shape == (num_audio, model.scene_embedding_size)
        # the same clips one at a time: a batch never mixes its rows
        torch.testing.assert_close(hear.get_scene_embeddings(audio[1:2], model)[0], scene[1], atol=1e-5, rtol=1e-5)


def test_hear_options_and_errors(folder, tmp_path):
    coarse = hear.load_model(str(folder), hop_ms=160, frequency="concat")
    assert coarse.timestamp_embedding_size == 64 * 8 and coarse.scene_embedding_size == 64
    embeddings, timestamps = hear.get_timestamp_embeddings(torch.zeros(1, 16000), coarse)
    assert timestamps[0].tolist() == [7.5 + 160 * k for k in range(7)] and embeddings.shape == (1, 7, 512)
    with pytest.raises(ValueError, match="hear-validator cat_hf.hear -m FOLDER"):
        hear.load_model()
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; cat_hf.hear loads a CAT model folder"):
        hear.load_model(str(weights))
    with pytest.raises(ValueError, match="pass the object that cat_hf.hear.load_model"):
        hear.get_scene_embeddings(torch.zeros(1, 16000), torch.nn.Linear(1, 1))
