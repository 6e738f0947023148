"""Reading clips and Gemma 4's log-mel features (mlx_gemma/audio.py).

References: transformers 5.25's `Gemma4AudioFeatureExtractor` (features and masks, live and
as stored in tests/fixtures/gemma4_audio/reference.npz) and its `load_audio(...,
backend="soundfile")` (decoding, downmix, resampling); the clips are a generated tone and
seeded speech-like noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from conftest import FIXTURES

from mlx_gemma.audio import LogMelSettings, clip_features, load_audio, log_mel_features, num_soft_tokens
from mlx_gemma.errors import AudioError, ConfigError

RATE = 16_000
REFERENCE = FIXTURES / "gemma4_audio" / "reference.npz"


def tone(n: int, rate: int = RATE) -> np.ndarray:
    t = np.arange(n) / rate
    return (0.5 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1320 * t)).astype(np.float32)


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """Low-passed noise under a ~4 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    noise = np.convolve(rng.standard_normal(n), np.hanning(9), mode="same")
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4.0 * np.arange(n) / RATE))
    return (0.3 * envelope * noise / np.abs(noise).max()).astype(np.float32)


def relative(ours: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


# ----- features ------------------------------------------------------------------------------


def test_features_equal_the_stored_extractor_output():
    """The fixture's tone (15500 samples) and noise (9001) as a padded batch, and the tone alone."""
    ref = np.load(REFERENCE)
    clips = [ref["pcm"][i, : n].astype(np.float32) / 32768.0 for i, n in enumerate(ref["lengths"])]
    features, mask = log_mel_features(clips)
    assert features.shape == ref["features"].shape == (2, 97, 128)
    assert np.array_equal(mask, ref["features_mask"])
    assert relative(features, ref["features"]) < 1e-5
    one, one_mask = log_mel_features(clips[0])  # one clip: [T, n_mels]
    assert relative(one, ref["features"][0]) < 1e-5 and np.array_equal(one_mask, ref["features_mask"][0])
    # The noise is 9001 samples: frames past its end are masked and zero.
    assert not mask[1, -1] and (features[1, ~mask[1]] == 0).all() and mask[1].sum() < mask[0].sum()


def test_soft_token_count_is_the_towers_valid_length():
    """num_soft_tokens(feature mask) = the tower's valid outputs (the stored reference's mask)."""
    ref = np.load(REFERENCE)
    counts = [num_soft_tokens(m) for m in ref["features_mask"]]
    assert counts == ref["batch_mask"].sum(axis=1).tolist()
    assert counts[0] > counts[1] > 0


@pytest.mark.oracle
@pytest.mark.parametrize("length", [257, 4000, 12345, 16000, 16001, 480_000 + 1000])
@pytest.mark.parametrize("kind", ["tone", "speech"])
def test_features_match_transformers(length, kind):
    """Lengths that need padding to 128 (all but 16000), a 2-frame clip, and one past 30 s (cut)."""
    Gemma4AudioFeatureExtractor = pytest.importorskip("transformers").Gemma4AudioFeatureExtractor

    clip = tone(length) if kind == "tone" else speechlike(length, seed=length)
    expected = Gemma4AudioFeatureExtractor()([clip], return_tensors="np")
    features, mask = log_mel_features(clip)
    assert features.shape == expected["input_features"][0].shape
    assert np.array_equal(mask, expected["input_features_mask"][0])
    assert relative(features, expected["input_features"][0]) < 1e-5


@pytest.mark.oracle
def test_batch_of_two_lengths_matches_transformers():
    Gemma4AudioFeatureExtractor = pytest.importorskip("transformers").Gemma4AudioFeatureExtractor

    clips = [speechlike(7000, seed=1), tone(20_000)]  # the shorter first: padded to the longer
    expected = Gemma4AudioFeatureExtractor()(clips, return_tensors="np")
    features, mask = log_mel_features(clips)
    assert features.shape == expected["input_features"].shape == (2, 125, 128)
    assert np.array_equal(mask, expected["input_features_mask"])
    assert relative(features, expected["input_features"]) < 1e-5
    # Float64 input (a list of Python floats is float64 too) is read as float32, as the extractor pads it.
    again, _ = log_mel_features([c.astype(np.float64) for c in clips])
    assert np.array_equal(again, features)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "settings",
    [
        {"preemphasis": 0.97},
        {"preemphasis": 0.97, "preemphasis_htk_flavor": False, "fft_overdrive": True},
        {"feature_size": 64, "min_frequency": 60.0, "max_frequency": 7600.0, "mel_floor": 1e-5,
         "input_scale_factor": 2.0, "frame_length_ms": 25.0, "hop_length_ms": 12.5},
        {"per_bin_mean": "random", "per_bin_stddev": "random"},
    ],
)
def test_other_settings_match_transformers(settings):
    Gemma4AudioFeatureExtractor = pytest.importorskip("transformers").Gemma4AudioFeatureExtractor

    rng = np.random.default_rng(3)
    size = settings.get("feature_size", 128)
    if settings.get("per_bin_mean") == "random":
        settings = {"per_bin_mean": rng.normal(size=size).tolist(),
                    "per_bin_stddev": rng.uniform(0.5, 2.0, size=size).tolist()}
    clips = [speechlike(9000, seed=4), tone(5000)]
    expected = Gemma4AudioFeatureExtractor(**settings)(clips, return_tensors="np")
    features, mask = log_mel_features(clips, LogMelSettings.from_dict(settings))
    assert np.array_equal(mask, expected["input_features_mask"])
    assert relative(features, expected["input_features"]) < 1e-5


@pytest.mark.oracle
def test_settings_read_what_transformers_saves():
    Gemma4AudioFeatureExtractor = pytest.importorskip("transformers").Gemma4AudioFeatureExtractor

    saved = json.loads(Gemma4AudioFeatureExtractor(mel_floor=1e-4).to_json_string())
    settings = LogMelSettings.from_dict(saved, "preprocessor_config.json")
    assert settings.mel_floor == 1e-4 and settings.frame_length == 320 and settings.fft_length == 512
    assert settings.extra == {"feature_extractor_type": "Gemma4AudioFeatureExtractor"}


def test_unknown_settings_are_kept():
    settings = LogMelSettings.from_dict({"feature_size": 128, "processor_class": "Gemma4Processor"})
    assert settings.extra == {"processor_class": "Gemma4Processor"}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"frame_length": 400}, "frame_length 400 disagrees"),
        ({"fft_length": 256}, "fft_length 256 disagrees"),
        ({"per_bin_mean": [0.0, 1.0]}, "per_bin_mean must list 128"),
        ({"per_bin_stddev": [0.0] * 128}, "per_bin_stddev holds a zero"),
        ({"padding_side": "left"}, "padding_side"),
        ({"mel_floor": 0}, "mel_floor must be a positive number"),
        ({"hop_length_ms": 0.01}, "hop"),
        ({"min_frequency": 9000.0}, "min_frequency <= max_frequency"),
        ({"feature_size": "128"}, "feature_size"),
    ],
)
def test_impossible_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        LogMelSettings.from_dict(change, "preprocessor_config.json")
    assert "preprocessor_config.json" in str(e.value)


@pytest.mark.parametrize(
    "audio, message",
    [
        (np.zeros(0, np.float32), "non-empty 1-D"),
        (np.zeros((1, 2, 3), np.float32), "non-empty 1-D"),
        (np.array([0.1, np.nan] * 200, np.float32), "finite float"),
        (np.zeros(400, np.int16), "finite float"),
        ([], "empty batch"),
        (np.zeros(100, np.float32), "at least 161"),
    ],
)
def test_bad_clips_are_refused(audio, message):
    with pytest.raises(AudioError, match=message):
        log_mel_features(audio)


def test_dither_draws_from_the_given_generator():
    clip = tone(4000)
    settings = LogMelSettings(dither=1e-3)
    a, _ = log_mel_features(clip, settings, rng=np.random.default_rng(0))
    b, _ = log_mel_features(clip, settings, rng=np.random.default_rng(0))
    plain, _ = log_mel_features(clip)
    assert np.array_equal(a, b) and not np.array_equal(a, plain)


# ----- reading -------------------------------------------------------------------------------


def _write(path, samples: np.ndarray, rate: int, **kwargs):
    soundfile.write(path, samples, rate, **kwargs)
    return path


def test_a_16k_mono_float_wav_reads_back_exactly(tmp_path):
    clip = speechlike(8000)
    path = _write(tmp_path / "a.wav", clip, RATE, subtype="FLOAT")
    assert np.array_equal(load_audio(path), clip)
    assert np.array_equal(load_audio(str(path)), clip)
    assert np.array_equal(load_audio(path.read_bytes()), clip)  # the file's bytes


def test_stereo_is_averaged_and_other_rates_resampled(tmp_path):
    left, right = tone(22050, 22050), speechlike(22050, seed=2)
    path = _write(tmp_path / "s.wav", np.stack([left, right], axis=1), 22050, subtype="FLOAT")
    mono_path = _write(tmp_path / "m.wav", (left + right) / 2, 22050, subtype="FLOAT")
    out = load_audio(path)
    assert out.dtype == np.float32 and out.shape == (16000,)  # ceil(22050 * 16000 / 22050)
    assert np.allclose(out, load_audio(mono_path), atol=1e-6)
    # The resampled tone keeps its pitch: the spectrum peaks at 220 Hz.
    resampled = load_audio(_write(tmp_path / "t.wav", tone(44100, 44100), 44100, subtype="FLOAT"))
    assert np.argmax(np.abs(np.fft.rfft(resampled))) == 220  # 1 s at 16 kHz: bin k is k Hz


def test_arrays_pcm_and_source_rate(tmp_path):
    pcm = (speechlike(8000) * 32767).astype(np.int16)
    from_file = load_audio(_write(tmp_path / "p.wav", pcm, RATE, subtype="PCM_16"))
    assert np.array_equal(load_audio(pcm), from_file)  # int16 scaled as soundfile reads it
    stereo = np.stack([pcm, pcm], axis=1)
    assert np.array_equal(load_audio(stereo), from_file)
    assert load_audio(speechlike(8000), source_rate=8000).shape == (16000,)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "name, rate, channels, kwargs",
    [
        ("a.wav", 44100, 2, {"subtype": "PCM_16"}),
        ("b.flac", 8000, 1, {}),
        ("c.ogg", 22050, 2, {"format": "OGG", "subtype": "VORBIS"}),
        ("d.wav", 16000, 3, {"subtype": "FLOAT"}),
    ],
)
def test_reading_matches_transformers(tmp_path, name, rate, channels, kwargs):
    reference_load = pytest.importorskip("transformers.audio_utils").load_audio

    n = int(rate * 0.7)
    data = np.stack([tone(n, rate), speechlike(n, seed=5), tone(n, rate) * 0.3][:channels], axis=1)
    path = _write(tmp_path / name, data, rate, **kwargs)
    expected = reference_load(str(path), sampling_rate=RATE, backend="soundfile")
    ours = load_audio(path)
    assert ours.dtype == expected.dtype == np.float32
    assert np.array_equal(ours, expected)


def test_unreadable_empty_nonfinite_and_long_clips_are_refused(tmp_path):
    with pytest.raises(AudioError, match="no such audio file") as e:
        load_audio(tmp_path / "missing.wav")
    assert "missing.wav" in str(e.value)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AudioError, match="junk.wav: not an audio file"):
        load_audio(junk)
    with pytest.raises(AudioError, match="holds no samples"):
        load_audio(_write(tmp_path / "empty.wav", np.zeros(0, np.float32), RATE))
    bad = np.full(1000, 0.1, np.float32)
    bad[500] = np.inf
    with pytest.raises(AudioError, match="inf.wav: the clip holds NaN or infinite"):
        load_audio(_write(tmp_path / "inf.wav", bad, RATE, subtype="FLOAT"))
    with pytest.raises(AudioError, match="long.wav: the clip lasts 2.0 s; over 1.5 s"):
        load_audio(_write(tmp_path / "long.wav", tone(32000), RATE), max_seconds=1.5)
    with pytest.raises(AudioError, match="over 30 s"):
        load_audio(np.zeros(31 * RATE, np.float32))


@pytest.mark.parametrize(
    "source, kwargs, message",
    [
        (np.zeros((2, 3, 4), np.float32), {}, r"\[N\] or \[N, channels\]"),
        (np.zeros(10, np.uint8), {}, "float or signed integer"),
        (np.zeros(10, np.float32), {"sampling_rate": 0}, "sampling_rate must be a positive integer"),
        (np.zeros(10, np.float32), {"source_rate": 8000.5}, "source_rate"),
        (np.zeros(10, np.float32), {"max_seconds": -1}, "max_seconds"),
        (12, {}, "expected a path"),
    ],
)
def test_bad_arguments_are_refused(source, kwargs, message):
    with pytest.raises(AudioError, match=message):
        load_audio(source, **kwargs)


def test_clip_features_reads_then_extracts(tmp_path):
    a = _write(tmp_path / "a.wav", speechlike(30_000, seed=6), 44100, subtype="FLOAT")
    b = tone(5000)
    features, mask = clip_features([a, b])
    expected = log_mel_features([load_audio(a), b])
    assert np.array_equal(features, expected[0]) and np.array_equal(mask, expected[1])
    one, one_mask = clip_features(a)
    assert one.shape == (1, *expected[0].shape[1:]) and np.array_equal(one[0], log_mel_features(load_audio(a))[0])
