"""Audio in, Gemma 4 audio features out: reading clips and their log-mel spectrogram.

- `load_audio`: a WAV / FLAC / OGG file (path or bytes) or a sample array -> float32 mono
  samples at the model's rate (16 kHz), read with soundfile (libsndfile) and resampled
  with soxr, as transformers' `load_audio(..., backend="soundfile")` does.
- `log_mel_features`: one clip or a batch -> (features [T, n_mels] / [B, T, n_mels],
  mask [T] / [B, T]), equal to transformers 5.25's `Gemma4AudioFeatureExtractor`
  (semicausal framing, periodic Hann window, HTK mel filters, log with a floor, clips
  padded to a multiple of 128 samples, a frame valid only if all its samples are real).
- `clip_features`: files (or arrays) -> features, the two steps above for a batch.
- `num_soft_tokens`: how many audio soft tokens a clip's mask gives (the tower's two
  stride-2 subsamplings), as the processor counts the placeholders it writes.
- `LogMelSettings`: the feature extractor's settings, from its `preprocessor_config.json`.

keras-hub 0.32's `Gemma4AudioConverter` differs from transformers (we follow transformers,
whose extractor Google's released processor files configure): it pads or trims every clip
to a fixed 30 s with no mask, counts `samples // hop` frames (transformers drops a frame whose
window runs past the clip end), builds its filters in float32, and its class default log
floor is 1e-5 (transformers' 1e-3; keras-hub's HF converter copies the file's `mel_floor`);
it reads no pre-emphasis or per-bin statistics.  Window, FFT size (512 over 320-sample
frames) and unnormalised HTK filters are the same.  In a Hugging Face folder the settings
are `processor_config.json`'s "feature_extractor" object (frame, hop and FFT in samples).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr

from .arguments import is_integer, is_real
from .errors import AudioError, ConfigError
from .models.config import parse_config

SAMPLING_RATE = 16_000
# The feature extractor keeps at most 480000 samples (30 s at 16 kHz) and cuts the rest.
MAX_SECONDS = 30.0
# Refused before decoding: no Gemma takes more, and a header can claim any length.
MAX_DECODE_SECONDS = 3600.0


# ----- reading ---------------------------------------------------------------------------


def load_audio(source, sampling_rate: int = SAMPLING_RATE, *, source_rate: int | None = None,
               max_seconds: float = MAX_SECONDS, name: str | None = None) -> np.ndarray:
    """A clip -> float32 mono samples [N] at `sampling_rate`.

    `source` is a path, the bytes of a file, or an array of samples: [N] or, as soundfile
    returns them, [N, channels]; float in [-1, 1] or signed integer PCM.  An array is
    taken to be at `source_rate` (default: already at `sampling_rate`).  Channels are
    averaged; other rates are resampled with soxr's "HQ" quality and padded or cut to
    ceil(N * rate / source rate) samples (transformers' soundfile backend, i.e. librosa).
    Clips longer than `max_seconds` (default 30 s, all the feature extractor keeps), empty,
    unreadable or holding NaN / infinity raise `AudioError` naming the file.
    """
    where = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "audio")
    _check_rate(sampling_rate, where, "sampling_rate")
    if not is_real(max_seconds) or max_seconds <= 0:
        raise AudioError(where, f"max_seconds must be a positive number, got {max_seconds!r:.80}")
    if isinstance(source, np.ndarray):
        rate = sampling_rate if source_rate is None else _check_rate(source_rate, where, "source_rate")
        samples = _mono(_float_samples(source, where), where)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        samples, rate = _read_file(source, where, max_seconds)
    else:
        raise AudioError(where, f"expected a path, file bytes or a numpy array, got {type(source).__name__}")
    if samples.size == 0:
        raise AudioError(where, "the clip holds no samples")
    if samples.size / rate > max_seconds:
        raise AudioError(where, f"the clip lasts {samples.size / rate:.1f} s; over {max_seconds:g} s is refused")
    if not np.isfinite(samples).all():
        raise AudioError(where, "the clip holds NaN or infinite samples")
    if rate != sampling_rate:
        samples = _resample(samples, rate, sampling_rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _check_rate(rate, where: str, key: str) -> int:
    if not is_integer(rate) or not 0 < rate <= 1 << 20:
        raise AudioError(where, f"{key} must be a positive integer (Hz), got {rate!r:.80}")
    return int(rate)


def _read_file(source, where: str, max_seconds: float) -> tuple[np.ndarray, int]:
    """(samples [N] mono float32, rate): the header is checked before anything is decoded."""
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise AudioError(where, "no such audio file")
    opened = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
    try:
        with soundfile.SoundFile(opened) as f:
            rate, frames = f.samplerate, f.frames
            if rate <= 0:
                raise AudioError(where, f"the file claims a sampling rate of {rate} Hz")
            limit = min(max_seconds, MAX_DECODE_SECONDS)
            if frames / rate > limit:
                raise AudioError(where, f"the clip lasts {frames / rate:.1f} s; over {limit:g} s is refused")
            data = f.read(dtype="float32", always_2d=True)  # [N, channels]
    except AudioError:
        raise
    except (soundfile.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise AudioError(where, f"not an audio file soundfile can read (WAV, FLAC, OGG, ...): {e}") from e
    return _mono(data, where), rate


def _float_samples(array: np.ndarray, where: str) -> np.ndarray:
    """Samples as float32: signed integer PCM scaled to [-1, 1) as soundfile reads it."""
    if array.ndim not in (1, 2):
        raise AudioError(where, f"samples must be [N] or [N, channels], got shape {array.shape}")
    if np.issubdtype(array.dtype, np.signedinteger):
        return array.astype(np.float32) / np.float32(-float(np.iinfo(array.dtype).min))
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(where, f"samples must be float or signed integer PCM, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _mono(data: np.ndarray, where: str) -> np.ndarray:
    """[N] or [N, channels] -> [N]: the channels' mean (transformers' soundfile backend, librosa)."""
    if data.ndim == 1:
        return data
    if data.shape[1] == 0:
        raise AudioError(where, "the clip has no channels")
    # The same reduction as the reference (mean over axis 0 of the [channels, N] view), so equal bits.
    return data.T.mean(axis=0) if data.shape[1] > 1 else data[:, 0]


def _resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    # transformers' `_load_audio_soundfile`: soxr "soxr_hq", then padded / cut to ceil(N * target / rate).
    length = math.ceil(samples.shape[-1] * target / rate)
    out = soxr.resample(samples, rate, target, quality="soxr_hq")
    return np.pad(out, (0, max(0, length - len(out))))[:length]


# ----- the feature extractor's settings -----------------------------------------------------


@dataclass
class LogMelSettings:
    """Gemma4AudioFeatureExtractor's settings; defaults are transformers 5.25's."""

    feature_size: int = 128  # mel bins per frame
    sampling_rate: int = SAMPLING_RATE  # Hz the clips must be at
    padding_value: float = 0.0  # sample value that pads a clip (silence)
    padding_side: str = "right"  # where padding goes; transformers pads Gemma 4 clips on the right
    return_attention_mask: bool = True  # the extractor returns the frame mask (we always do)
    frame_length_ms: float = 20.0  # analysis window, ms (320 samples at 16 kHz)
    hop_length_ms: float = 10.0  # stride between frames, ms (160 samples)
    frame_length: int | None = None  # the window in samples, as the extractor saves it; must agree with _ms
    hop_length: int | None = None  # the hop in samples, as saved; must agree with hop_length_ms
    fft_length: int | None = None  # FFT size, as saved; must be the next power of two (x2 with overdrive)
    min_frequency: float = 0.0  # lowest mel filter edge, Hz
    max_frequency: float = 8000.0  # highest mel filter edge, Hz
    preemphasis: float = 0.0  # pre-emphasis coefficient (0: none)
    preemphasis_htk_flavor: bool = True  # HTK's first-sample rule for pre-emphasis
    fft_overdrive: bool = False  # double the FFT length
    dither: float = 0.0  # std of Gaussian noise added to the samples (random; 0: none)
    input_scale_factor: float = 1.0  # samples are multiplied by this first
    mel_floor: float = 1e-3  # added before the log
    per_bin_mean: list | None = None  # subtracted from each mel bin's log (feature_size numbers)
    per_bin_stddev: list | None = None  # then each bin divided by this (feature_size numbers)
    max_length: int = 480_000  # the call's default: longer clips are cut to this many samples
    pad_to_multiple_of: int = 128  # the call's default: padded length is a multiple of this
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None) -> "LogMelSettings":
        """From a `preprocessor_config.json` dict; impossible values raise ConfigError naming `path`."""
        settings = parse_config(cls, config, path)
        settings._check(path)
        return settings

    @property
    def window_samples(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_samples(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_size(self) -> int:
        size = 2 ** math.ceil(math.log2(self.window_samples))
        return size * 2 if self.fft_overdrive else size

    def _check(self, path) -> None:
        for key in ("feature_size", "sampling_rate", "max_length", "pad_to_multiple_of"):
            v = getattr(self, key)
            if not is_integer(v) or not 0 < v <= 1 << 24:
                raise ConfigError(path, f"{key} must be a positive integer, got {v!r:.80}")
        for key in ("frame_length_ms", "hop_length_ms", "input_scale_factor", "mel_floor"):
            if not is_real(getattr(self, key)) or getattr(self, key) <= 0:
                raise ConfigError(path, f"{key} must be a positive number, got {getattr(self, key)!r:.80}")
        if not (self.window_samples >= 1 and self.hop_samples >= 1 and self.window_samples <= 1 << 16):
            raise ConfigError(path, f"frame_length_ms / hop_length_ms give a {self.window_samples}-sample window "
                              f"and a {self.hop_samples}-sample hop")
        for key, derived in (("frame_length", self.window_samples), ("hop_length", self.hop_samples),
                             ("fft_length", self.fft_size)):
            if getattr(self, key) is not None and getattr(self, key) != derived:
                # transformers derives these from the _ms settings and only stores them.
                raise ConfigError(path, f"{key} {getattr(self, key)!r:.40} disagrees with the {derived} derived "
                                  "from frame_length_ms / hop_length_ms / fft_overdrive")
        if not 0 <= self.min_frequency <= self.max_frequency:
            raise ConfigError(path, f"need 0 <= min_frequency <= max_frequency, got {self.min_frequency}, "
                              f"{self.max_frequency}")
        if self.padding_side != "right":
            raise ConfigError(path, f"padding_side {self.padding_side!r:.40} is not supported (only 'right')")
        for key in ("per_bin_mean", "per_bin_stddev"):
            values = getattr(self, key)
            if values is not None and (len(values) != self.feature_size or not all(is_real(v) for v in values)):
                raise ConfigError(path, f"{key} must list {self.feature_size} finite numbers")
        if self.per_bin_stddev is not None and not all(v != 0 for v in self.per_bin_stddev):
            raise ConfigError(path, "per_bin_stddev holds a zero")
        if not is_real(self.dither) or self.dither < 0 or not 0 <= self.preemphasis < 1:
            raise ConfigError(path, f"need dither >= 0 and 0 <= preemphasis < 1, got {self.dither}, "
                              f"{self.preemphasis}")


# ----- log-mel features ---------------------------------------------------------------------


def mel_filters(settings: LogMelSettings) -> np.ndarray:
    """Triangular HTK-scale mel filters [fft_size // 2 + 1, feature_size], float64, unnormalised
    (transformers' `mel_filter_bank(norm=None, mel_scale="htk")`, as the Gemma 4 extractor builds it)."""
    s = settings
    n_bins = s.fft_size // 2 + 1

    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)

    mels = np.linspace(to_mel(s.min_frequency), to_mel(s.max_frequency), s.feature_size + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # [feature_size + 2] Hz
    # Bin centres from 0 to the *integer* Nyquist, as transformers' `linspace(0, sr // 2, n)`.
    bins = np.linspace(0, s.sampling_rate // 2, n_bins)[:, None]  # [n_bins, 1]
    rising = (bins - edges[None, :-2]) / np.diff(edges)[None, :-1]
    falling = (edges[None, 2:] - bins) / np.diff(edges)[None, 1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def hann_window(length: int) -> np.ndarray:
    """The periodic Hann window, float32: 0.5 - 0.5 cos(2 pi n / length)."""
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def log_mel_features(audio, settings: LogMelSettings | None = None,
                     rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clips at `settings.sampling_rate` -> (log-mel features, frame mask), as transformers'
    `Gemma4AudioFeatureExtractor()(audio)` returns `input_features` / `input_features_mask`.

    One clip ([N] array) gives ([T, n_mels] float32, [T] bool); a batch (a list of [N_i]
    arrays, or a [B, N] array) gives ([B, T, n_mels], [B, T]), every clip right-padded to
    the longest.  Clips longer than `max_length` samples are cut to it (30 s), lengths
    are padded to a multiple of `pad_to_multiple_of` (128), and a frame is valid (mask
    True) only if every sample of its window is real audio; invalid frames are zeros.
    `rng` draws the dither noise when the settings ask for it.
    """
    s = settings or LogMelSettings()
    batched = isinstance(audio, (list, tuple)) or (isinstance(audio, np.ndarray) and audio.ndim > 1)
    clips = [_clip(a, f"audio[{i}]") for i, a in enumerate(audio)] if batched else [_clip(audio, "audio")]
    if not clips:
        raise AudioError("audio", "an empty batch of clips")
    clips = [c[: s.max_length] for c in clips]  # truncation, as the extractor's call does by default
    longest = max(len(c) for c in clips)
    length = -(-longest // s.pad_to_multiple_of) * s.pad_to_multiple_of
    waves = np.full((len(clips), length), s.padding_value, dtype=np.float32)  # [B, length]
    valid = np.zeros((len(clips), length), dtype=bool)
    for i, c in enumerate(clips):
        waves[i, : len(c)], valid[i, : len(c)] = c, True
    features, mask = _spectrogram(waves, valid, s, rng)
    if features.shape[1] == 0:
        raise AudioError("audio", f"the longest clip has {longest} samples; at least "
                         f"{s.window_samples + 1 - s.window_samples // 2} give one feature frame")
    return (features, mask) if batched else (features[0], mask[0])


def _clip(samples, where: str) -> np.ndarray:
    array = np.asarray(samples)
    if array.ndim != 1 or array.size == 0:
        raise AudioError(where, f"a clip must be a non-empty 1-D array of samples, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise AudioError(where, "a clip must hold finite float samples (use load_audio for PCM)")
    return array.astype(np.float32, copy=False)  # the extractor pads in float32


def _spectrogram(waves: np.ndarray, valid: np.ndarray, s: LogMelSettings,
                 rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Padded clips [B, L] float32 and their sample mask [B, L] -> ([B, T, n_mels] float32, [B, T] bool)."""
    if s.dither > 0.0:
        noise = (rng or np.random.default_rng()).standard_normal(waves.shape).astype(np.float32)
        waves = waves + np.float32(s.dither) * noise
    if s.input_scale_factor != 1.0:
        waves = waves * s.input_scale_factor
    # Semicausal padding: half a window of zeros in front, so frame 0 is centred on sample 0.
    pad = s.window_samples // 2
    waves = np.pad(waves, ((0, 0), (pad, 0)))
    valid = np.pad(valid, ((0, 0), (pad, 0)))
    # Frames of window + 1 samples (the extra one feeds pre-emphasis), `hop` apart.
    span = s.window_samples + 1
    n_frames = max(0, (waves.shape[1] - span) // s.hop_samples + 1)
    starts = np.arange(n_frames) * s.hop_samples
    frames = waves[:, starts[:, None] + np.arange(span)[None, :]]  # [B, T, span]
    frames = _preemphasis(frames, s)  # [B, T, window]
    spectrum = np.abs(np.fft.rfft(frames * hann_window(s.window_samples), n=s.fft_size, axis=-1))
    log_mel = np.log(spectrum @ mel_filters(s) + np.float64(s.mel_floor))  # float64, as the reference
    if s.per_bin_mean is not None:
        log_mel = log_mel - np.asarray(s.per_bin_mean, dtype=np.float64)
    if s.per_bin_stddev is not None:
        log_mel = log_mel / np.asarray(s.per_bin_stddev, dtype=np.float64)
    # A frame counts only if the last sample of its (window + 1) span is real audio.
    mask = valid[:, starts + span - 1]  # [B, T]
    return log_mel.astype(np.float32) * mask[..., None], mask


def _preemphasis(frames: np.ndarray, s: LogMelSettings) -> np.ndarray:
    """[B, T, window + 1] -> [B, T, window]: y[n] = x[n] - k x[n-1] (HTK: y[0] = (1 - k) x[0])."""
    k = s.preemphasis
    if k <= 0.0:
        return frames[..., :-1]
    if s.preemphasis_htk_flavor:
        return np.concatenate([frames[..., :1] * (1.0 - k), frames[..., 1:-1] - k * frames[..., :-2]], axis=-1)
    return frames[..., 1:] - k * frames[..., :-1]


def clip_features(sources, settings: LogMelSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Files or sample arrays (one, or a list) -> `log_mel_features` of the clips read by
    `load_audio` at the settings' rate: ([B, T, n_mels], [B, T]), a batch even for one clip."""
    s = settings or LogMelSettings()
    sources = sources if isinstance(sources, (list, tuple)) else [sources]
    return log_mel_features([load_audio(source, s.sampling_rate) for source in sources], s)


def num_soft_tokens(mask) -> int:
    """Audio soft tokens a clip's frame mask [T] gives: the tower's two stride-2 convolutions keep
    every other frame twice (the count transformers' Gemma4Processor writes placeholders for)."""
    kept = np.asarray(mask, dtype=bool)
    for _ in range(2):
        kept = kept[::2]
    return int(kept.sum())
