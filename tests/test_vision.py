"""Image preprocessing, PaliGemma prompts, detection parsing and drawing.

References: the pixel values and input ids transformers' PaliGemmaProcessor
(SiglipImageProcessorPil + GemmaTokenizer over the tiny test tokenizer) produced
in tests/fixtures/make_tiny_paligemma.py, and, live, the same processor on
images of every Pillow mode.  Boxes follow big_vision's encoding of a
coordinate v in [0, 1] as round(v * 1023) (big_vision/pp/proj/paligemma/segmentation.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

import mlx_gemma
from mlx_gemma import vision
from mlx_gemma.errors import ImageError

REF = dict(np.load(FIXTURES / "tiny_paligemma" / "reference.npz"))
SIZE = 42


@pytest.fixture(scope="module")
def loaded():
    return mlx_gemma.load(FIXTURES / "tiny_paligemma")


def test_prompt_inputs_equal_the_reference_processor(loaded):
    model, tokenizer = loaded
    ids, pixels, padding = vision.prompt_inputs(
        model, tokenizer, ["caption en", "detect cat ; dog"], [REF["image0"], REF["image1"]]
    )
    np.testing.assert_array_equal(np.array(ids), REF["input_ids"])
    np.testing.assert_array_equal(np.array(padding), (REF["attention_mask"] == 0).sum(1))
    np.testing.assert_allclose(np.array(pixels), REF["pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)


def test_one_image_serves_every_prompt(loaded):
    model, tokenizer = loaded
    ids, pixels, _ = vision.prompt_inputs(model, tokenizer, ["caption en"] * 2, REF["image0"])
    np.testing.assert_array_equal(np.array(ids), REF["same_ids"])
    assert pixels.shape == (2, SIZE, SIZE, 3)


def test_wrong_image_count_is_refused(loaded):
    model, tokenizer = loaded
    with pytest.raises(ImageError, match="3 images for 2 prompts"):
        vision.prompt_inputs(model, tokenizer, ["a", "b"], [REF["image0"]] * 3)


def test_float_arrays_in_either_range_equal_uint8():
    u8 = vision.preprocess_image(REF["image0"], SIZE)
    np.testing.assert_array_equal(vision.preprocess_image(REF["image0"] / 255.0, SIZE), u8)
    np.testing.assert_array_equal(vision.preprocess_image(REF["image0"].astype(np.float32), SIZE), u8)
    # The seed example's input: np.random.rand(224, 224, 3).
    x = vision.preprocess_image(np.random.default_rng(0).random((224, 224, 3)), 224)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1


def hf_pixels(image, resample=Image.Resampling.BICUBIC):
    transformers = pytest.importorskip("transformers")
    proc = transformers.SiglipImageProcessorPil(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=resample
    )
    return proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def mode_images():
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8))
    palette = rgb.convert("P")
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    return {
        "RGB": rgb, "RGBA": rgba, "L": rgb.convert("L"), "P": palette,
        "P+transparency": palette_transparent, "CMYK": rgb.convert("CMYK"), "LA": rgba.convert("LA"),
    }


@pytest.mark.oracle
@pytest.mark.parametrize("mode", list(mode_images()))
def test_every_mode_matches_the_reference_processor(mode):
    image = mode_images()[mode]
    np.testing.assert_allclose(vision.preprocess_image(image, SIZE), hf_pixels(image), atol=1e-6)


@pytest.mark.oracle
def test_bilinear_option_matches_the_reference_processor():
    image = mode_images()["RGB"]
    ours = vision.preprocess_image(image, SIZE, resample="bilinear")
    np.testing.assert_allclose(ours, hf_pixels(image, Image.Resampling.BILINEAR), atol=1e-6)
    assert np.abs(ours - vision.preprocess_image(image, SIZE)).max() > 1e-3


@pytest.mark.oracle
def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    transformers = pytest.importorskip("transformers")
    image = mode_images()["RGB"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    loaded = vision.load_image(path)
    assert loaded.size == (40, 30)  # width and height swapped by the rotation
    reference = transformers.image_utils.load_image(str(path))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(reference.convert("RGB")))


def test_path_and_pil_inputs_agree(tmp_path):
    image = mode_images()["RGBA"]
    path = tmp_path / "x.png"
    image.save(path)
    np.testing.assert_array_equal(vision.preprocess_image(path, SIZE), vision.preprocess_image(image, SIZE))
    np.testing.assert_array_equal(vision.preprocess_image(str(path), SIZE), vision.preprocess_image(image, SIZE))


def test_corrupt_and_missing_files_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no such image file"):
        vision.load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="junk.png: not an image"):
        vision.load_image(junk)
    buf = io.BytesIO()
    mode_images()["RGB"].resize((300, 300)).save(buf, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated.png: corrupt or truncated"):
        vision.load_image(truncated)


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ImageError, match="big.png: image is 100 x 100 pixels"):
        vision.load_image(path)
    with pytest.raises(ImageError, match="image is 100 x 100 pixels"):
        vision.load_image(Image.new("L", (100, 100)))
    # Pillow's own guard (a header claiming over twice its limit) is reported the same way.
    monkeypatch.setattr(vision, "MAX_IMAGE_PIXELS", 1 << 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="big.png: too large to decode safely"):
        vision.load_image(path)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4, 2), np.uint8), "must be \\[H, W\\]"),
        (np.zeros((0, 4, 3), np.uint8), "empty or too large"),
        (np.full((4, 4, 3), -0.5), "expected \\[0, 1\\] or \\[0, 255\\]"),
        (np.full((4, 4, 3), 300.0), "expected \\[0, 1\\] or \\[0, 255\\]"),
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.zeros((4, 4, 3), bool), "dtype bool"),
    ],
)
def test_bad_arrays_are_image_errors(array, message):
    with pytest.raises(ImageError, match=message):
        vision.preprocess_image(array, SIZE)


def test_bad_resample_and_type():
    with pytest.raises(ImageError, match="resample"):
        vision.preprocess_image(REF["image0"], SIZE, resample="lanczos")
    with pytest.raises(ImageError, match="expected a path, a PIL image or a numpy array"):
        vision.load_image(12)


# ----- detection and segmentation ----------------------------------------------------


def loc(v: float) -> str:
    """big_vision's token for a coordinate v in [0, 1]: <loc{round(v * 1023)}>."""
    return f"<loc{int(round(v * 1023)):04d}>"


def test_boxes_in_original_pixels():
    W, H = 640, 480
    text = (
        "<loc0000><loc0000><loc1023><loc1023> cat ; "
        "<loc0100><loc0200><loc0300><loc0400> dog ; <loc0512><loc0256><loc0768><loc1000> traffic light"
    )
    dets = vision.parse_detections(text, (W, H))
    assert [d.label for d in dets] == ["cat", "dog", "traffic light"]
    assert dets[0].box == (0.0, 0.0, W, H)
    # (y_min, x_min, y_max, x_max) bins -> x = bin / 1023 * W, y = bin / 1023 * H.
    np.testing.assert_allclose(dets[1].box, (200 / 1023 * W, 100 / 1023 * H, 400 / 1023 * W, 300 / 1023 * H))
    np.testing.assert_allclose(dets[2].box, (256 / 1023 * W, 512 / 1023 * H, 1000 / 1023 * W, 768 / 1023 * H))
    assert all(d.segmentation is None for d in dets)


def test_encoding_round_trips_within_half_a_bin():
    W, H = 300, 200
    box = (0.25, 0.1, 0.75, 0.9)  # y_min, x_min, y_max, x_max as fractions
    (det,) = vision.parse_detections("".join(loc(v) for v in box) + " person", (W, H))
    expected = (0.1 * W, 0.25 * H, 0.9 * W, 0.75 * H)
    np.testing.assert_allclose(det.box, expected, atol=0.5 / 1023 * max(W, H))


def test_segmentation_codes():
    seg = "".join(f"<seg{i * 7:03d}>" for i in range(16))
    text = f"<loc0010><loc0020><loc0030><loc0040>{seg} cat ; <loc0001><loc0002><loc0003><loc0004> cat"
    dets = vision.parse_detections(text, (1023, 1023))
    assert dets[0].segmentation == tuple(i * 7 for i in range(16))
    assert dets[0].box == (20.0, 10.0, 40.0, 30.0)
    assert dets[1].segmentation is None and dets[1].label == "cat"


def test_malformed_pieces_are_skipped():
    text = "<loc0010><loc0020><loc0030> half ; <loc1024><loc0000><loc0001><loc0002> out ; no boxes here"
    assert vision.parse_detections(text, (10, 10)) == []


def test_draw_detections_writes_a_png_of_the_image_size(tmp_path):
    image = Image.new("RGB", (120, 80), (0, 0, 0))
    dets = vision.parse_detections("<loc0256><loc0256><loc0768><loc0768> cat", image.size)
    path = tmp_path / "out.png"
    drawn = vision.draw_detections(image, dets, path)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (120, 80)
        x0, y0, x1, y1 = (int(round(v)) for v in dets[0].box)
        assert saved.convert("RGB").getpixel((x0 + (x1 - x0) // 2, y1)) != (0, 0, 0)  # bottom edge drawn
        assert saved.convert("RGB").getpixel((x0 + (x1 - x0) // 2, (y0 + y1) // 2)) == (0, 0, 0)  # inside untouched
    assert drawn.size == image.size
    assert image.getpixel((60, 60)) == (0, 0, 0)  # the input is not modified
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no temporary left behind


def test_image_token_outside_the_tokenizer(tmp_path):
    """Google's PaliGemma vocabulary has no <image> piece: the config's image_token_index (the
    id transformers' processor appends after the last piece) is used, and gives the same logits."""
    import json
    import shutil

    import mlx.core as mx

    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny_paligemma", folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_token_index"] = 400  # the tiny tokenizer has 400 pieces
    (folder / "config.json").write_text(json.dumps(config))
    model, tokenizer = mlx_gemma.load(folder)
    ids, pixels, padding = vision.prompt_inputs(
        model, tokenizer, ["caption en", "detect cat ; dog"], [REF["image0"], REF["image1"]]
    )
    expected_ids = np.where(REF["input_ids"] == 6, 400, REF["input_ids"])
    np.testing.assert_array_equal(np.array(ids), expected_ids)
    real = REF["attention_mask"].astype(bool)
    logits = np.array(model(ids, pixel_values=pixels, padding_mask=mx.array(real)))
    assert np.abs(logits - REF["logits"])[real].max() / np.abs(REF["logits"]).max() < 1e-4


def test_one_pixel_image_fills_the_frame_and_empty_images_are_refused(tmp_path):
    """A 1 x 1 image is a valid (if tiny) picture: resized, its one colour fills the model's
    frame, scaled to [-1, 1] as (v / 255 - 0.5) / 0.5.  A 0 x 0 one is refused."""
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 128)).save(path)
    pixels = vision.preprocess_image(path, 28)
    assert pixels.shape == (28, 28, 3)
    np.testing.assert_allclose(pixels, np.broadcast_to([1.0, -1.0, 128 / 127.5 - 1], (28, 28, 3)), atol=1e-6)
    with pytest.raises(ImageError, match="no pixels"):
        vision.preprocess_image(Image.new("RGB", (0, 0)), 28)


# ----- fuzzing -------------------------------------------------------------------------

import struct  # noqa: E402

from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from fuzzing import fuzz_settings, refused_cleanly  # noqa: E402


def _encoded(fmt: str, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 12, 4), dtype=np.uint8), "RGBA").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    return _encoded("JPEG", exif=exif.tobytes())


# One small valid file per format and oddity the loader handles.
FUZZ_IMAGES = {
    "png": _encoded("PNG"), "rgba.png": _encoded("PNG", "RGBA"), "p.png": _encoded("PNG", "P", transparency=3),
    "i16.png": _encoded("PNG", "I;16"), "jpeg": _encoded("JPEG"), "cmyk.jpeg": _encoded("JPEG", "CMYK"),
    "exif.jpeg": _exif_jpeg(), "gif": _encoded("GIF", "P"), "bmp": _encoded("BMP"),
    "webp": _encoded("WEBP", "RGBA", lossless=True), "tiff": _encoded("TIFF", "LA"),
}


@st.composite
def mutated_image(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(FUZZ_IMAGES)))
    data = bytearray(FUZZ_IMAGES[name])
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "number", "none"]))
    # Headers (sizes, depths, chunk lengths) live in the first bytes: aim there half the time.
    at = st.integers(0, min(len(data), 64) - 1) | st.integers(0, len(data) - 1)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(at)] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "insert":
        i = draw(at)
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "number":  # a width, height, length or offset that lies
        fmt = draw(st.sampled_from([">H", "<H", ">I", "<I"]))
        value = draw(st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]) | st.integers(0, 0xFFFF))
        packed = struct.pack(fmt, value if value < 1 << (8 * struct.calcsize(fmt)) else 0)
        i = draw(at)
        data[i:i + len(packed)] = packed
    return name, bytes(data)


@fuzz_settings(300)
@given(image=mutated_image())
def test_fuzz_image_files(tmp_path, image):
    """Corrupt, truncated, bomb-sized or odd image files: preprocessed to finite pixels in
    [-1, 1], or refused with an ImageError naming the file."""
    name, data = image
    path = tmp_path / f"fuzz.{name}"
    path.write_bytes(data)
    pixels = None
    with refused_cleanly(path, error=ImageError):
        pixels = vision.preprocess_image(path, 8)
    if pixels is not None:
        assert pixels.shape == (8, 8, 3) and pixels.dtype == np.float32
        assert np.isfinite(pixels).all() and pixels.min() >= -1 and pixels.max() <= 1


_DTYPES = st.sampled_from(["u1", "u2", "i4", ">i2", "u8", "f2", "f4", ">f8", "f8", "?", "c8", "M8[s]", "U2", "V2", "O"])


@st.composite
def image_arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(_DTYPES))
    shape = draw(st.sampled_from([(5, 4), (5, 4, 1), (5, 4, 3), (5, 4, 4), (0, 4, 3), (4, 0), (3,), (),
                                  (2, 5, 4, 3), (5, 4, 2), (5, 4, 5), (1, 1, 3)]))
    if dtype.kind == "V":  # raw bytes: no element strategy, zeros will do
        return np.zeros(shape, dtype)
    return draw(hnp.arrays(dtype, shape))  # anything the dtype holds, NaN and infinities included


@fuzz_settings(300)
@given(array=image_arrays() | st.sampled_from(["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I",
                                              "F", "LA", "PA", "RGBX", "RGBa", "La", "I;16", "I;16B", "I;16L",
                                              "I;16N"]).map(lambda mode: Image.new(mode, (5, 4))))
# Premultiplied "La": Pillow cannot convert it to RGB and raised a bare ValueError.
@example(array=Image.new("La", (5, 4))).via("test_fuzz_image_mode_La")
def test_fuzz_image_arrays_and_modes(array):
    """Arrays of any dtype and shape (NaN, infinities, out-of-range values) and PIL images in
    every mode: preprocessed, or refused with an ImageError naming the input."""
    pixels = None
    with refused_cleanly("pixels", error=ImageError):
        pixels = vision.preprocess_image(array, 8, name="pixels")
    if pixels is not None:
        assert pixels.shape == (8, 8, 3) and np.isfinite(pixels).all()
        assert pixels.min() >= -1 and pixels.max() <= 1
