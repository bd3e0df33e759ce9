"""cat_hf.xares through X-ARES's own checker and encoder lookup (xares imports them without torchaudio)."""

from __future__ import annotations

import sys

import pytest
import torch

from cat_hf import CATConfig, CATFeatureExtractor, CATModel
from cat_hf.xares import encoder_class

xares_checker = pytest.importorskip("xares.audio_encoder_checker", reason="X-ARES: pip install --no-deps xares loguru")
xares_utils = pytest.importorskip("xares.utils")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("xares-cat")
    config = CATConfig.from_preset("cat-tiny", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   stem_channels=[8, 16])
    CATModel(config).save_pretrained(path)
    CATFeatureExtractor().save_pretrained(path)
    return path


def test_one_line_encoder_file_passes_check_audio_encoder(folder, tmp_path, monkeypatch):
    # The user's whole encoder file, found the way `python -m xares.run cat_encoder.py ...` finds it.
    (tmp_path / "cat_encoder.py").write_text(f"import cat_hf.xares\nCATEncoder = cat_hf.xares.encoder_class({str(folder)!r})\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    encoder = xares_utils.attr_from_py_path("cat_encoder.py", endswith="Encoder")()
    assert xares_checker.check_audio_encoder(encoder) is True
    assert (encoder.sampling_rate, encoder.output_dim, encoder.hop_size_in_ms) == (16000, 64, 160.0)
    assert "torchaudio" not in sys.modules
    # X-ARES's call: a (B, T) batch at the encoder's rate -> (B, T', D), one row per clip, one frame per hop
    audio = torch.randn(3, 16000 * 3)
    frames = encoder.to("cpu")(audio)
    assert frames.shape == (3, 19, 64) and frames.dtype == torch.float32
    torch.testing.assert_close(encoder(audio[2:]), frames[2:], atol=1e-5, rtol=1e-5)


def test_encoder_class_options_and_errors(folder):
    fine = encoder_class(folder, name="CATFineEncoder", hop_ms=40, layer=[0, 1])()
    assert type(fine).__name__ == "CATFineEncoder" and fine.hop_size_in_ms == 40.0
    assert xares_checker.check_audio_encoder(fine) is True
    assert fine(torch.randn(2, 8000), sampling_rate=8000).shape == (2, 25, 64)  # 1 s at 8 kHz, resampled
    with pytest.raises(ValueError, match="ending in 'Encoder'"):
        encoder_class(folder, name="CATModelForXares")
    with pytest.raises(ValueError, match="is a file"):
        encoder_class(folder / "config.json")
