"""Decoding real files written with soundfile: formats, rates, channels, resampling, and bad inputs."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from cat_hf.audio import AudioDecodeError, audio_info, describe_audio_source, is_audio_file, load_audio


def _sine(freq: float, sr: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(waveform: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / sr)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    "name, sr, write_kwargs",
    [
        ("pcm16.wav", 16000, {"subtype": "PCM_16"}),
        ("float.wav", 16000, {"subtype": "FLOAT"}),
        ("low.wav", 8000, {"subtype": "PCM_16"}),
        ("mid.flac", 22050, {}),
        ("cd.flac", 44100, {}),
        ("vorbis.ogg", 44100, {"format": "OGG", "subtype": "VORBIS"}),
        ("speech.mp3", 22050, {"format": "MP3"}),
    ],
)
def test_formats_and_rates_keep_the_sine_frequency(tmp_path, name, sr, write_kwargs):
    path = tmp_path / name
    sf.write(path, _sine(440.0, sr), sr, **write_kwargs)
    waveform = load_audio(path)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    # 1 s at any rate becomes ~16000 samples (mp3 adds encoder padding of a few ms).
    assert abs(len(waveform) - 16000) <= (1200 if name.endswith(".mp3") else 2)
    assert abs(_peak_hz(waveform, 16000) - 440.0) < 3.0
    # PCM16 quantises, lossy codecs change samples; amplitude survives within a few percent.
    assert 0.45 < np.abs(waveform[2000:14000]).max() < 0.56


def test_resampled_sine_matches_the_analytic_signal(tmp_path):
    path = tmp_path / "cd.wav"
    sf.write(path, _sine(1000.0, 44100, seconds=0.5), 44100, subtype="FLOAT")
    waveform = load_audio(path, 16000)
    expected = _sine(1000.0, 16000, seconds=0.5)
    assert len(waveform) == len(expected)
    # soxr's filter is linear-phase and delay-compensated: away from the edges the samples match closely.
    assert np.max(np.abs(waveform[200:-200] - expected[200:-200])) < 1e-2


def test_stereo_is_averaged_to_mono_and_mono_false_keeps_channels(tmp_path):
    sr = 22050
    left, right = _sine(300.0, sr), _sine(1200.0, sr, amplitude=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="FLOAT")

    mono = load_audio(path, target_sr=None)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-6)

    channels = load_audio(path, 16000, mono=False)
    assert channels.shape == (2, 16000)
    assert abs(_peak_hz(channels[0], 16000) - 300) < 3 and abs(_peak_hz(channels[1], 16000) - 1200) < 3


def test_bytes_and_datasets_dicts_decode_like_the_path(tmp_path):
    path = tmp_path / "clip.flac"
    sf.write(path, _sine(440.0, 8000), 8000)
    reference = load_audio(path)
    data = path.read_bytes()
    np.testing.assert_array_equal(load_audio(data), reference)
    np.testing.assert_array_equal(load_audio({"path": str(path), "bytes": None}), reference)
    np.testing.assert_array_equal(load_audio({"path": "nonexistent-name.flac", "bytes": data}), reference)  # bytes win
    decoded = load_audio({"array": _sine(440.0, 8000), "sampling_rate": 8000})
    np.testing.assert_allclose(decoded, reference, atol=1e-4)
    # int16 arrays are PCM and get scaled; (channels, samples) arrays are down-mixed.
    pcm = (np.stack([_sine(440.0, 8000)] * 2) * 32768).astype(np.int16)
    np.testing.assert_allclose(load_audio({"array": pcm, "sampling_rate": 8000}), reference, atol=1e-3)


def test_audio_info_reads_the_header(tmp_path):
    path = tmp_path / "stereo.flac"
    sf.write(path, np.zeros((4410, 2), dtype=np.float32), 44100)
    info = audio_info(path)
    assert (info.sampling_rate, info.num_frames, info.num_channels) == (44100, 4410, 2)
    assert info.duration == pytest.approx(0.1)


def test_bad_inputs_raise_audio_decode_error_naming_file_and_reason(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00 definitely not audio " * 20)
    zero = tmp_path / "zero.wav"
    sf.write(zero, np.zeros(0, dtype=np.float32), 16000)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2] * 100, dtype=np.float32), 16000, subtype="FLOAT")

    cases = {
        empty: "empty file (0 bytes)",
        corrupt: "unreadable",
        zero: "zero length",
        nan: "NaN",
        tmp_path / "missing.wav": "no such file",
    }
    for path, reason in cases.items():
        with pytest.raises(AudioDecodeError) as caught:
            load_audio(path)
        message = str(caught.value)
        assert str(path) in message and reason in message, message
        assert caught.value.source == f"'{path}'"
        assert isinstance(caught.value, ValueError)
    with pytest.raises(AudioDecodeError, match="empty input"):
        load_audio(b"")
    with pytest.raises(AudioDecodeError, match="sampling_rate"):
        load_audio({"array": np.zeros(10)})
    with pytest.raises(AudioDecodeError, match="neither 'bytes' nor 'path'"):
        load_audio({"path": None, "bytes": None})
    with pytest.raises(AudioDecodeError, match="unreadable"):
        audio_info(corrupt)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the ffmpeg fallback needs the ffmpeg binary")
def test_ffmpeg_fallback_decodes_containers_libsndfile_cannot(tmp_path):
    source = tmp_path / "tone.wav"
    sf.write(source, _sine(660.0, 24000), 24000)
    m4a = tmp_path / "tone.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(source), "-c:a", "aac", str(m4a)], check=True)
    with pytest.raises(sf.LibsndfileError):
        sf.read(m4a)  # the fallback is what makes this work
    waveform = load_audio(m4a)
    assert abs(len(waveform) - 16000) < 1600
    assert abs(_peak_hz(waveform, 16000) - 660.0) < 3.0
    assert audio_info(m4a.read_bytes()).sampling_rate == 24000


def test_helpers():
    assert is_audio_file("a/B.FLAC") and is_audio_file("x.oga") and not is_audio_file("notes.txt")
    assert describe_audio_source(b"abc") == "<3 bytes in memory>"
    assert describe_audio_source({"path": "x.wav", "bytes": b"1"}) == "'x.wav'"
