"""Videos in, Gemma 4 vision inputs out, as transformers 5.25's Gemma4VideoProcessor prepares them.

A video is a few of its frames, each seen as an image at a smaller budget (70 soft tokens by
default, against an image's 280), with its time in the prompt.  The processor:

1. samples frames: `num_frames` (32) at i * total // num_frames, or `fps` frames a second
   (video_utils.py `default_sample_indices_fn`);
2. resizes every frame to the aspect-preserving size of its budget (gemma4_images.target_size)
   with torchvision's antialiased bicubic on uint8 (`resize_frames` here: the same fixed-point
   arithmetic, so the same bytes), then x / 255 in float32 (its fused rescale-normalize);
3. cuts row-major patches with (x, y) positions, padded to the budget's patch count;
4. writes, per frame, "mm:ss " and `<|image>`, one `<|video|>` per soft token, `<image|>`, the
   frames joined by " " (processing_gemma4.py `replace_video_token`), the time being the frame's
   index / the video's fps (24 when unknown).

Gemma4Model treats a `<|video|>` placeholder as it treats an `<|image|>`: embedded as the pad id,
filled with the same tower's and embedder's features in order, and a vision block for the
bidirectional mask (modeling_gemma4.py `get_placeholder_mask`, `get_video_features`,
`get_block_sequence_ids_for_mask`).  So mlx_gemma feeds a video's frames as images
(`video_block`'s `token_id` is the model's image id): the logits are those of transformers'
video input, and a prompt cache and chunked prefill handle each frame as an image.

Files are decoded with PyAV (`pip install "mlx_gemma[video]"`), as transformers' `load_video`
does by default (`read_video_pyav`): the container's frame count and average rate, frames as
rgb24.  PyAV wraps FFmpeg's own decoders (every common container and codec) and ships wheels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import ConfigError, ImageError
from .gemma4_images import ImageSettings, pad_patches, patchify, target_size
from .json_input import expect

VIDEO_TOKEN = "<|video|>"  # a frame's soft-token placeholder in transformers' prompts
DEFAULT_FPS = 24.0  # processing_gemma4.py `replace_video_token` when a video's fps is unknown
# The most bytes of a video file read, and of decoded frames kept (frames [T, H, W, 3] uint8).
MAX_VIDEO_BYTES = 4 << 30
MAX_FRAME_BYTES = 2 << 30
_BICUBIC = 3  # Pillow's code for bicubic, the video processor's `resample` (the only one done here)


@dataclass(frozen=True)
class VideoSettings:
    # the per-frame image settings: patch, pooling, budget (video default 70), rescale, normalize
    image: ImageSettings = field(default_factory=lambda: ImageSettings(max_soft_tokens=70))
    num_frames: int | None = 32  # frames sampled uniformly; None: every frame (or `fps`)
    fps: float | None = None  # frames sampled per second of video, instead of num_frames
    do_sample_frames: bool = True  # False: every frame given is used
    extra: dict[str, Any] = field(default_factory=dict)  # processor keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "video_processor.") -> VideoSettings:
        """From `processor_config.json`'s "video_processor" entry (Gemma4VideoProcessor's fields)."""
        expect(config, dict, path, where.rstrip("."))
        config = dict(config)
        known: dict[str, Any] = {}
        if "num_frames" in config:
            n = config.pop("num_frames")
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 1 << 16):
                raise ConfigError(path, f"{where}num_frames must be a positive integer or null, got {n!r:.40}")
            known["num_frames"] = n
        if "fps" in config:
            fps = config.pop("fps")
            if fps is not None and not _positive(fps):
                raise ConfigError(path, f"{where}fps must be a positive number or null, got {fps!r:.40}")
            known["fps"] = fps
        if "do_sample_frames" in config:
            known["do_sample_frames"] = expect(config.pop("do_sample_frames"), bool, path, where + "do_sample_frames")
        if known.get("num_frames", cls.num_frames) is not None and known.get("fps") is not None:
            # Gemma4VideoProcessor refuses fps beside its default of 32 frames too.
            raise ConfigError(path, f"{where}num_frames and fps exclude each other: sampling by fps needs "
                                    "num_frames null (the processor refuses both)")
        image = ImageSettings.from_dict({"max_soft_tokens": 70, **config}, path, where)
        if image.resample != _BICUBIC:
            raise ConfigError(path, f"{where}resample = {image.resample} is not supported (only 3, bicubic)")
        return cls(image=image, extra=image.extra, **known)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


# ----- frame sampling ------------------------------------------------------------------


def sample_frame_indices(total: int, num_frames: int | None = 32, fps: float | None = None,
                         video_fps: float | None = None) -> np.ndarray:
    """Frames taken from a video of `total` frames: `num_frames` uniformly, i * total // num_frames,
    or, with `fps` (and the video's own `video_fps`), max(1, int(total / video_fps * fps)) of them
    (transformers' `default_sample_indices_fn`; asking for more frames than there are is an error)."""
    if num_frames is not None and fps is not None:
        raise ImageError("video", "give num_frames or fps, not both")
    if num_frames is None and fps is not None:
        if not video_fps or video_fps <= 0:
            raise ImageError("video", "sampling by fps needs the video's own frame rate (video_fps)")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None:
        return np.arange(total)
    if not 0 < num_frames <= total:
        raise ImageError("video", f"cannot sample {num_frames} frames from a video of {total} frames")
    return np.arange(num_frames) * total // num_frames


def sampled_indices(total: int, settings: VideoSettings, video_fps: float | None) -> np.ndarray:
    """The frames the processor keeps of `total` under `settings`."""
    if not settings.do_sample_frames:
        return np.arange(total)
    return sample_frame_indices(total, None if settings.fps is not None else settings.num_frames,
                                settings.fps, video_fps)


# ----- resizing: torchvision's antialiased bicubic on uint8 -------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """The bicubic kernel with a = -0.5 (Pillow's and torch's antialiased bicubic)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices [n_out, K], int16-range weights [n_out, K] and their precision (bits) of one
    axis, as torch's uint8 antialiased kernel (UpSampleKernel.cpp `_compute_weights_aa`, then
    `_compute_index_ranges_int16_weights`): weights in float64, normalized per output, scaled by
    the most bits that keep the largest weight under 2^15, rounded half away from zero."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0  # bicubic's 4 taps, widened when shrinking
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's truncation
    hi = np.minimum((center + support + 0.5).astype(np.int64), n_in)
    j = np.arange(int((hi - lo).max()))
    w = np.where(j[None] < (hi - lo)[:, None], _cubic((j[None] + lo[:, None] - center[:, None] + 0.5) * inv), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total == 0, 1.0, total), w)
    bits = 0
    while bits < 22 and int(0.5 + w.max() * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    scaled = w * (1 << bits)
    weights = np.where(scaled < 0, scaled - 0.5, scaled + 0.5).astype(np.int64)  # truncates toward zero
    return np.minimum(lo[:, None] + j[None], n_in - 1), weights, bits


def _resize_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """uint8 `x` resized along `axis`: integer sums of taps x weights, rounded, shifted, clamped."""
    if x.shape[axis] == n_out:
        return x  # torch skips an axis whose size does not change
    index, weights, bits = _taps(x.shape[axis], n_out)
    src = np.moveaxis(x, axis, -1).astype(np.int64)
    acc = np.full(src.shape[:-1] + (n_out,), 1 << (bits - 1), np.int64)
    for k in range(index.shape[1]):
        acc += src[..., index[:, k]] * weights[:, k]
    return np.moveaxis(np.clip(acc >> bits, 0, 255).astype(np.uint8), -1, axis)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> [T, height, width, 3], byte for byte as torchvision's
    `resize(..., BICUBIC, antialias=True)` on a uint8 tensor on the CPU: the width first, then the
    height, each pass rounded to uint8 (torch's native uint8 path, ported from Pillow-SIMD)."""
    return _resize_axis(_resize_axis(frames, width, 2), height, 1)


# ----- frames -> tower inputs -----------------------------------------------------------


@dataclass
class Gemma4Video:
    pixel_values: mx.array  # [frames, max_patches, 3 * patch^2] float32
    position_ids: mx.array  # [frames, max_patches, 2] int32, (-1, -1) for padding
    num_soft_tokens: int  # per frame (all frames share the video's size)
    timestamps: list[float]  # seconds of each sampled frame: index / fps
    indices: list[int] = field(default_factory=list)  # the sampled frames' indices in the video


def frame_pixels(frames: np.ndarray, image: ImageSettings) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, h, w, 3] at the budget's size: resized, then rescaled and
    normalized as transformers' torchvision backend fuses them, (x - mean / r) / (std / r) in float32
    for rescale factor r (image_processing_backends.py `_fuse_mean_std_and_rescale_factor`)."""
    h, w = target_size(frames.shape[1], frames.shape[2], image)
    x = resize_frames(frames, h, w).astype(np.float32)
    if image.do_rescale and image.do_normalize:
        mean = np.array(image.image_mean, np.float64) * (1.0 / image.rescale_factor)
        std = np.array(image.image_std, np.float64) * (1.0 / image.rescale_factor)
        return (x - mean.astype(np.float32)) / std.astype(np.float32)
    if image.do_rescale:
        return x * np.float32(image.rescale_factor)
    if image.do_normalize:
        return (x - np.array(image.image_mean, np.float32)) / np.array(image.image_std, np.float32)
    return x


def preprocess_video(frames, fps: float | None = None, settings: VideoSettings = VideoSettings(),
                     indices: np.ndarray | None = None, name: str = "video") -> Gemma4Video:
    """Decoded frames [T, H, W, 3] uint8 -> the sampled frames' tower inputs and timestamps.

    `fps` is the video's frame rate (the timestamps assume 24 when it is None, as the processor
    does); `indices`, when given, says which frames of the video `frames` already are (a decoder
    that kept only the sampled ones), else they are sampled here under `settings`.
    """
    if fps is not None and not _positive(fps):
        raise ImageError(name, f"fps must be a positive number, got {fps!r:.40}")
    frames = np.asarray(frames) if isinstance(frames, (list, tuple)) else frames
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ImageError(name, f"frames must be a uint8 array [T, H, W, 3], got "
                               f"{getattr(frames, 'shape', type(frames).__name__)} {getattr(frames, 'dtype', '')}")
    if indices is None:
        indices = sampled_indices(len(frames), settings, fps)
        frames = frames[indices]
    elif len(indices) != len(frames):
        raise ImageError(name, f"{len(indices)} frame indices for {len(frames)} frames")
    image = settings.image
    pixels = frame_pixels(frames, image)  # [T, h, w, 3]
    rows, positions = [], []
    for frame in pixels:
        patches, pos = patchify(frame, image.patch_size)
        tokens = len(patches) // image.pooling_kernel_size**2
        patches, pos = pad_patches(patches, pos, image.max_patches)
        rows.append(patches)
        positions.append(pos)
    rate = fps or DEFAULT_FPS
    return Gemma4Video(mx.array(np.stack(rows)), mx.array(np.stack(positions)), tokens,
                       [float(i) / rate for i in indices], [int(i) for i in indices])


# ----- prompt text ----------------------------------------------------------------------


def timestamp(seconds: float) -> str:
    """"mm:ss", as the processor writes a frame's time (minutes not wrapped at the hour)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def video_text(video: Gemma4Video, boi: str = "<|image>", token: str = VIDEO_TOKEN, eoi: str = "<image|>") -> str:
    """A video's prompt text: per frame "mm:ss " and its block, frames joined by " "
    (processing_gemma4.py `replace_video_token`)."""
    return " ".join(f"{timestamp(t)} {boi}{token * video.num_soft_tokens}{eoi}" for t in video.timestamps)


def video_block(num_soft_tokens: int, timestamps: list[float], start_id: int, token_id: int, end_id: int) -> list:
    """`video_text` as segments: text (str) and ids (int), for a tokenizer that encodes the text
    runs between the ids, as the processor's tokenizer splits the string at its special tokens."""
    out: list = []
    for i, t in enumerate(timestamps):
        out += [(" " if i else "") + timestamp(t) + " ", start_id, *[token_id] * num_soft_tokens, end_id]
    return out


# ----- decoding files (PyAV, optional) ----------------------------------------------------


def read_video(path, settings: VideoSettings = VideoSettings()) -> tuple[np.ndarray, float | None, np.ndarray]:
    """(sampled frames [n, H, W, 3] uint8, the video's fps, their indices) of a video file, as
    transformers' `read_video_pyav`: the first video stream's frame count and average rate, the
    frames decoded in order and the sampled ones kept as rgb24."""
    try:
        import av  # optional dependency (the "video" extra); heavy, imported only to read a file
    except ImportError:
        raise ImageError(path, 'reading video files needs PyAV: pip install "mlx_gemma[video]" (or pip install av)') \
            from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageError(path, "no such video file")
    if os.path.getsize(path) > MAX_VIDEO_BYTES:
        raise ImageError(path, f"is over {MAX_VIDEO_BYTES} bytes; larger videos are refused")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ImageError(path, "holds no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            total = int(stream.frames) or _count_frames(container, path)
            indices = sampled_indices(total, settings, rate)
            if len(indices) * stream.height * stream.width * 3 > MAX_FRAME_BYTES:
                raise ImageError(path, f"{len(indices)} frames of {stream.width} x {stream.height} are too many to keep")
            frames = _decode(container, indices)
    except av.FFmpegError as e:
        raise ImageError(path, f"cannot decode the video: {e}") from None
    if len(frames) != len(indices):
        raise ImageError(path, f"the container announces {total} frames but {len(frames)} of the "
                               f"{len(indices)} sampled could be decoded")
    return np.stack(frames), rate, indices


def _count_frames(container, path) -> int:
    """Frames of the first video stream, by decoding (a container that does not say)."""
    n = sum(1 for _ in container.decode(video=0))
    container.seek(0)
    if n == 0:
        raise ImageError(path, "holds no video frames")
    return n


def _decode(container, indices: np.ndarray) -> list[np.ndarray]:
    wanted, last, frames = set(int(i) for i in indices), int(indices[-1]), []
    for i, frame in enumerate(container.decode(video=0)):
        if i > last:
            break
        if i in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
    return frames


def load_video(video, settings: VideoSettings = VideoSettings(), fps: float | None = None,
               name: str = "video") -> Gemma4Video:
    """A video -> `Gemma4Video`: a file path (decoded with PyAV), frames [T, H, W, 3] uint8 (with
    `fps`, the video's rate, for the timestamps; 24 assumed when None), or a `Gemma4Video` (kept)."""
    if isinstance(video, Gemma4Video):
        return video
    if isinstance(video, (str, os.PathLike)):
        frames, rate, indices = read_video(video, settings)
        return preprocess_video(frames, rate, settings, indices, name=os.fspath(video))
    return preprocess_video(video, fps, settings, name=name)
