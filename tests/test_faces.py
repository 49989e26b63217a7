"""Face detection (MediaPipe BlazeFace) on a real photograph, and the image decoding in front of it:
formats, colour conversions, clear errors, the pixel limit and decompression bombs."""

from __future__ import annotations

import json
import resource
import struct
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from skimage import data as skdata

from ml_service.backends import faces
from ml_service.backends.faces import (
    KEYPOINT_NAMES,
    DetectionError,
    FaceDetection,
    FaceDetector,
    ImageError,
    decode_image,
    image_size,
)

RGB = npt.NDArray[np.uint8]
# The astronaut's face in skimage's 512 x 512 photograph, as the short-range model boxes it
# (measured: x 0.347, y 0.162, 0.186 x 0.186, score 0.92), with some slack.
FACE_BOX = (0.347, 0.162, 0.186, 0.186)


@pytest.fixture(scope="module")
def astronaut() -> RGB:
    load: Callable[[], RGB] = skdata.astronaut  # skimage is untyped
    image = load()
    assert image.shape == (512, 512, 3)
    assert image.dtype == np.uint8
    return image


@pytest.fixture(scope="module")
def detector() -> Iterator[FaceDetector]:
    with FaceDetector() as detector:
        yield detector


@pytest.fixture(scope="module")
def full_range() -> Iterator[FaceDetector]:
    with FaceDetector(model_selection=1) as detector:
        yield detector


def encode(image: npt.NDArray[Any], ext: str, params: list[int] | None = None) -> bytes:
    """An RGB, RGBA or grey ``image`` encoded by OpenCV, which expects BGR(A) channel order."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    ok, buffer = cv2.imencode(ext, image, params or [])
    assert ok
    return bytes(buffer.tobytes())


def iou(a: FaceDetection, b: FaceDetection) -> float:
    width = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    height = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    inter = max(0.0, width) * max(0.0, height)
    return inter / (a.width * a.height + b.width * b.height - inter)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def webp_extended(simple: bytes, width: int, height: int) -> bytes:
    """A simple (VP8 / VP8L) WebP file rewritten in the extended format: a VP8X chunk first."""
    assert simple[:4] == b"RIFF"
    assert simple[8:12] == b"WEBP"
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes(4)
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- detection --------------------------------------------------------------------------------


def test_astronaut_has_one_face(detector: FaceDetector, astronaut: RGB) -> None:
    found = detector.detect(astronaut)
    assert len(found) == 1
    face = found[0]
    assert face.score > 0.8
    # Inside the image...
    assert 0.0 <= face.x < face.x + face.width <= 1.0
    assert 0.0 <= face.y < face.y + face.height <= 1.0
    # ...and on her face: upper middle of the picture, about a fifth of its width.
    x, y, width, height = FACE_BOX
    assert face.x == pytest.approx(x, abs=0.04)
    assert face.y == pytest.approx(y, abs=0.04)
    assert face.width == pytest.approx(width, abs=0.04)
    assert face.height == pytest.approx(height, abs=0.04)

    points = {point.name: point for point in face.keypoints}
    assert tuple(points) == KEYPOINT_NAMES
    for point in face.keypoints:
        assert face.x - 0.05 <= point.x <= face.x + face.width + 0.05, point
        assert face.y - 0.05 <= point.y <= face.y + face.height + 0.05, point
    mouth = points["mouth_center"]
    assert points["right_eye"].y < points["nose_tip"].y < mouth.y
    assert points["left_eye"].y < points["nose_tip"].y < mouth.y
    # Her right eye is on the left of the picture.
    assert points["right_eye"].x < points["nose_tip"].x < points["left_eye"].x


def test_to_dict_is_json(detector: FaceDetector, astronaut: RGB) -> None:
    (face,) = detector.detect(astronaut)
    document = json.loads(json.dumps(face.to_dict()))
    assert set(document) == {"x", "y", "width", "height", "score", "keypoints"}
    assert document["score"] == face.score
    assert [point["name"] for point in document["keypoints"]] == list(KEYPOINT_NAMES)
    assert FaceDetection(**{**document, "keypoints": face.keypoints}) == face


@pytest.mark.parametrize("value", [0, 255])
def test_blank_frames_have_no_face(detector: FaceDetector, value: int) -> None:
    assert detector.detect(np.full((480, 640, 3), value, dtype=np.uint8)) == []


def test_flipped_astronaut(detector: FaceDetector, astronaut: RGB) -> None:
    (face,) = detector.detect(astronaut)
    mirrored = astronaut[:, ::-1]  # a non-contiguous view is accepted
    assert not mirrored.flags.c_contiguous
    (flipped,) = detector.detect(mirrored)
    assert flipped.score > 0.8
    assert flipped.x == pytest.approx(1.0 - face.x - face.width, abs=0.04)
    assert flipped.y == pytest.approx(face.y, abs=0.04)


def test_two_astronauts_need_the_full_range_model(
    detector: FaceDetector, full_range: FaceDetector, astronaut: RGB
) -> None:
    """Side by side, each face is ~9 % of the frame's width: the short-range model (128 x 128
    input, for faces filling much of the frame) finds neither, the full-range one both."""
    pair = np.hstack([astronaut, astronaut])
    assert detector.detect(pair) == []
    found = full_range.detect(pair)
    assert len(found) == 2
    left, right = sorted(found, key=lambda face: face.x)
    assert left.x + left.width <= 0.5 <= right.x
    assert right.x - left.x == pytest.approx(0.5, abs=0.02)
    assert min(left.score, right.score) > 0.7


def test_frames_are_independent(detector: FaceDetector, astronaut: RGB) -> None:
    """The legacy graph keeps no state across frames: a frame's result does not depend on the
    frames before it, and a fresh detector gives the same."""
    first = detector.detect(astronaut)
    assert detector.detect(np.zeros_like(astronaut)) == []
    assert detector.detect(astronaut[:, ::-1]) != first
    assert detector.detect(astronaut) == first
    with FaceDetector() as fresh:
        assert fresh.detect(astronaut) == first


def test_min_confidence(detector: FaceDetector, astronaut: RGB) -> None:
    (face,) = detector.detect(astronaut)
    assert detector.detect(astronaut, min_confidence=face.score - 0.01) == [face]
    assert detector.detect(astronaut, min_confidence=min(1.0, face.score + 0.01)) == []
    with pytest.raises(ValueError, match=r"below this detector's threshold 0\.5"):
        detector.detect(astronaut, min_confidence=0.3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        detector.detect(astronaut, min_confidence=1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        detector.detect(astronaut, min_confidence=float("nan"))


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="model_selection must be 0 or 1"):
        FaceDetector(model_selection=2)
    with pytest.raises(ValueError, match="between 0 and 1"):
        FaceDetector(min_confidence=-0.1)


def test_concurrent_detections(detector: FaceDetector, astronaut: RGB) -> None:
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    expected = {0: detector.detect(astronaut), 1: detector.detect(mirrored)}
    images = {0: astronaut, 1: mirrored}
    errors: list[BaseException] = []
    mismatches: list[tuple[int, int]] = []
    start = threading.Barrier(2)

    def work(which: int) -> None:
        try:
            start.wait()
            for i in range(30):
                if detector.detect(images[which]) != expected[which]:
                    mismatches.append((which, i))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert mismatches == []


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((64, 64), np.uint8), r"shape \(height, width, 3\), not \(64, 64\)"),
        (np.zeros((64, 64, 4), np.uint8), r"shape \(height, width, 3\), not \(64, 64, 4\)"),
        (np.zeros((64, 64, 3), np.float32), "dtype uint8, not float32"),
        (np.zeros((0, 64, 3), np.uint8), r"empty image of shape \(0, 64, 3\)"),
        ([[[0, 0, 0]]], "expected a NumPy array, not list"),
    ],
)
def test_detect_rejects_bad_arrays(
    detector: FaceDetector, astronaut: RGB, array: object, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        detector.detect(array)  # type: ignore[arg-type]
    assert len(detector.detect(astronaut)) == 1  # still usable


def test_graph_failure_rebuilds_the_graph(astronaut: RGB, monkeypatch: pytest.MonkeyPatch) -> None:
    with FaceDetector() as detector:
        broken = detector._solution

        def fail(image: RGB) -> None:
            raise RuntimeError("Graph has errors: simulated")

        monkeypatch.setattr(broken, "process", fail)
        with pytest.raises(DetectionError, match="face detection failed: Graph has errors"):
            detector.detect(astronaut)
        assert detector._solution is not broken
        assert len(detector.detect(astronaut)) == 1


def test_close(astronaut: RGB) -> None:
    detector = FaceDetector()
    with detector:
        assert not detector.closed
    assert detector.closed
    assert "closed" in repr(detector)
    detector.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        detector.detect(astronaut)


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "params", "lossless"),
    [
        (".png", [], True),
        (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 92], False),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 90], False),  # VP8
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], True),  # VP8L
        (".bmp", [], True),
    ],
)
def test_encoded_images_give_the_same_face(
    detector: FaceDetector, astronaut: RGB, ext: str, params: list[int], lossless: bool
) -> None:
    encoded = encode(astronaut, ext, params)
    decoded = decode_image(encoded)
    assert decoded.shape == astronaut.shape
    assert decoded.dtype == np.uint8
    assert decoded.flags.c_contiguous
    if lossless:
        np.testing.assert_array_equal(decoded, astronaut)
    else:  # same channel order: a swap would move the mean of every channel
        difference = np.abs(decoded.astype(np.int16) - astronaut).mean(axis=(0, 1))
        assert (difference < 6).all(), difference
    (reference,) = detector.detect(astronaut)
    (face,) = detector.detect(decoded)
    assert iou(face, reference) > 0.9
    assert face.score == pytest.approx(reference.score, abs=0.05)


def test_extended_webp(astronaut: RGB) -> None:
    simple = encode(astronaut, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 90])
    extended = webp_extended(simple, 512, 512)
    assert extended[12:16] == b"VP8X"
    assert image_size(extended) == ("webp", 512, 512)
    assert decode_image(extended).shape == (512, 512, 3)


def test_greyscale_and_rgba_become_rgb(astronaut: RGB) -> None:
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    for ext in (".png", ".jpg"):
        decoded = decode_image(encode(grey, ext))
        assert decoded.shape == (512, 512, 3)
        assert (decoded[..., 0] == decoded[..., 1]).all()
        assert (decoded[..., 1] == decoded[..., 2]).all()
        if ext == ".png":
            np.testing.assert_array_equal(decoded[..., 0], grey)

    alpha = np.linspace(0, 255, 512, dtype=np.uint8)[None, :].repeat(512, axis=0)
    rgba = np.dstack([astronaut, alpha])
    decoded = decode_image(encode(rgba, ".png"))
    np.testing.assert_array_equal(decoded, astronaut)  # alpha dropped, colours kept
    # Lossless WebP keeps colours too, except under fully transparent pixels (libwebp drops them).
    decoded = decode_image(encode(rgba, ".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]))
    visible = alpha > 0
    np.testing.assert_array_equal(decoded[visible], astronaut[visible])

    deep = astronaut.astype(np.uint16) * 257  # 16-bit PNG
    decoded = decode_image(encode(deep, ".png"))
    np.testing.assert_array_equal(decoded, astronaut)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty image data"),
        (b"hello, this is not an image", r"unsupported image format \(first bytes 68 65 6c"),
        (b"II*\x00" + bytes(64), "expected PNG, JPEG, WebP or BMP"),  # TIFF: refused
        (b"\x89PNG\r\n\x1a\n" + bytes(8), "invalid PNG: no IHDR header"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "invalid JPEG: no frame header"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "invalid WebP"),
        (b"BM" + bytes(10), "invalid BMP: truncated header"),
        (grey_png(0, 10, b""), r"invalid PNG: it declares a size of 0x10"),
    ],
)
def test_undecodable_bytes(payload: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(payload)


def test_corrupt_image_data(astronaut: RGB) -> None:
    png = encode(astronaut, ".png")
    with pytest.raises(ImageError, match="could not decode the PNG image"):
        decode_image(png[:200])  # header intact, pixels cut off
    garbled = png[:100] + bytes(len(png) - 100)
    with pytest.raises(ImageError, match="could not decode the PNG image"):
        decode_image(garbled)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".bmp"])
def test_pixel_limit_is_checked_from_the_header(astronaut: RGB, ext: str) -> None:
    encoded = encode(astronaut, ext)
    assert image_size(encoded)[1:] == (512, 512)
    assert decode_image(encoded, max_pixels=512 * 512).shape == (512, 512, 3)
    with pytest.raises(
        ImageError, match=r"is 512x512 \(262,144 pixels\), over the limit of 262,143"
    ):
        decode_image(encoded, max_pixels=512 * 512 - 1)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        decode_image(encoded, max_pixels=0)


def test_pixel_limit_after_decoding(astronaut: RGB, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoded array is checked too, should a header ever understate the size."""
    encoded = encode(astronaut, ".png")
    monkeypatch.setattr(faces, "image_size", lambda data: ("png", 1, 1))
    with pytest.raises(ImageError, match=r"the decoded image is 512x512"):
        decode_image(encoded, max_pixels=1000)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    """A valid 1 MB PNG that decodes to 15000 x 15000 (675 MB as RGB; OpenCV alone would decode
    it, its own limit being 2**30 pixels) is refused from its header: no big allocation."""
    side = 15000
    compressor = zlib.compressobj(1)
    row_block = bytes((side + 1) * 500)  # 500 rows: a filter byte and zero pixels each
    idat = b"".join(compressor.compress(row_block) for _ in range(side // 500))
    bomb = grey_png(side, side, idat + compressor.flush())
    assert len(bomb) < 2_000_000

    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"PNG image is 15000x15000 \(225,000,000 pixels\)"):
            decode_image(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_rss_kib
    assert peak < 10_000_000
    assert grown_kib < 100_000


@pytest.mark.parametrize(
    ("payload", "size"),
    [
        (grey_png(100_000, 100_000, b""), "100000x100000"),
        # JPEG: SOI, an APP0 segment, then a baseline frame header for 30000 x 30000
        (
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
            + b"\xff\xc0\x00\x11\x08"
            + struct.pack(">HH", 30000, 30000)
            + b"\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01",
            "30000x30000",
        ),
        (webp_extended(b"RIFF\x00\x00\x00\x00WEBP", 16383, 16383), "16383x16383"),
        (
            b"BM" + bytes(12) + struct.pack("<Iii", 40, 20000, -20000) + bytes(28),
            "20000x20000",
        ),
    ],
)
def test_oversized_headers_are_refused(payload: bytes, size: str) -> None:
    with pytest.raises(ImageError, match=rf"image is {size} \("):
        decode_image(payload)
