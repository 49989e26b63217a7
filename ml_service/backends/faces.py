"""Face detection with MediaPipe's legacy ``face_detection`` solution (BlazeFace), on the CPU.

The models ship inside the mediapipe 0.10.21 wheel: nothing is downloaded. Two parts:

* :func:`decode_image` turns PNG, JPEG, WebP or BMP bytes into an RGB ``uint8`` array of shape
  ``(height, width, 3)``. It reads the dimensions from the file header first and refuses an image
  over ``max_pixels`` *before* decoding: a few hundred kilobytes of PNG can declare 16000 x 16000
  pixels and decode to 768 MB (OpenCV's own limit is 2**30 pixels, 3 GB as RGB). Other formats
  OpenCV could read (TIFF, JPEG 2000, OpenEXR, PNM...) are refused: their headers are not checked.
  Grayscale and 16-bit images become 8-bit RGB, an alpha channel is dropped, and JPEG EXIF
  orientation is applied (OpenCV's ``IMREAD_COLOR``).
* :class:`FaceDetector` runs a detection graph on such arrays and returns :class:`FaceDetection`
  records with coordinates relative to the image (0 to 1).

Video frames: one detector serves successive frames. The legacy face-detection graph has no
``static_image_mode`` switch because it needs none: it is ImageToTensor -> TFLite inference ->
TensorsToDetections -> non-maximum suppression -> projection, with no loopback or tracking
calculator, so every frame is detected on its own and the result for a frame does not depend on
the frames before it (the tests check this). MediaPipe stamps each frame with a synthetic timestamp
33 333 us after the previous one; the detector's lock keeps those in order.

Threads: a MediaPipe graph is not re-entrant and its ``process`` hands results back through
per-instance state, so :meth:`FaceDetector.detect` holds a lock for the whole call, conversion of
the results included. Concurrent callers of one detector are serialised; use one detector per
thread for parallelism (each costs a few megabytes).

Importing MediaPipe takes about a second and loads matplotlib (its ``drawing_utils`` imports
``matplotlib.pyplot`` unconditionally) and tries ``sounddevice``; it is therefore imported on the
first :class:`FaceDetector`, not with this module.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "KEYPOINT_NAMES",
    "DetectionError",
    "FaceDetection",
    "FaceDetector",
    "ImageError",
    "Keypoint",
    "decode_image",
    "image_size",
]

RGBImage = npt.NDArray[np.uint8]

DEFAULT_MAX_PIXELS: Final = 40_000_000
# MediaPipe's order. "Right" and "left" are the person's own: their right eye is usually on the
# left of the picture.
KEYPOINT_NAMES: Final = (
    "right_eye",
    "left_eye",
    "nose_tip",
    "mouth_center",
    "right_ear_tragion",
    "left_ear_tragion",
)
MODEL_SELECTIONS: Final = {0: "short-range (faces within ~2 m)", 1: "full-range (within ~5 m)"}


class ImageError(ValueError):
    """The image cannot be used: undecodable, unsupported, too large, or the wrong array."""


class DetectionError(RuntimeError):
    """The MediaPipe graph failed on an input; the detector has been rebuilt and is usable."""


@dataclass(frozen=True, slots=True)
class Keypoint:
    """A facial landmark, relative to the image: ``x`` from the left, ``y`` from the top."""

    name: str
    x: float
    y: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "x": self.x, "y": self.y}


@dataclass(frozen=True, slots=True)
class FaceDetection:
    """A face: its box (top-left corner and size) and keypoints, all relative (0 to 1) and clamped
    to the image, and the detector's confidence ``score`` (0 to 1)."""

    x: float
    y: float
    width: float
    height: float
    score: float
    keypoints: tuple[Keypoint, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
            "score": self.score,
            "keypoints": [keypoint.to_dict() for keypoint in self.keypoints],
        }


# --- decoding -------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers, which carry the image size: C0-CF but DHT (C4), JPG (C8), DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # TEM, SOI, RST0-7: no length


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError("invalid PNG: no IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: memoryview) -> tuple[int, int]:
    i, end = 2, len(data)
    while i < end:
        if data[i] != 0xFF:
            raise ImageError("invalid JPEG: corrupt marker structure before the frame header")
        while i < end and data[i] == 0xFF:  # a marker may be preceded by fill bytes
            i += 1
        if i >= end:
            break
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            break
        if i + 2 > end:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            raise ImageError("invalid JPEG: corrupt segment length")
        if marker in _JPEG_SOF:
            if i + 7 > end:
                break
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            return width, height
        i += length
    raise ImageError("invalid JPEG: no frame header (truncated or corrupt)")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise ImageError("invalid WebP: unrecognised or truncated header")


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise ImageError("invalid BMP: truncated header")
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    if header_size >= 40:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)  # a negative height means rows stored top-down
    raise ImageError(f"invalid BMP: unknown header size {header_size}")


def image_size(data: bytes | bytearray | memoryview) -> tuple[str, int, int]:
    """``(format, width, height)`` read from the header of PNG, JPEG, WebP or BMP ``data``,
    without decoding it. Raises :class:`ImageError` for other or malformed data."""
    view = memoryview(data).cast("B")
    head = view[:32].tobytes()
    if not head:
        raise ImageError("empty image data")
    if head.startswith(_PNG_SIGNATURE):
        kind, (width, height) = "png", _png_size(head)
    elif head.startswith(b"\xff\xd8\xff"):
        kind, (width, height) = "jpeg", _jpeg_size(view)  # EXIF, ICC... may come first
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind, (width, height) = "webp", _webp_size(head)
    elif head.startswith(b"BM"):
        kind, (width, height) = "bmp", _bmp_size(head)
    else:
        raise ImageError(
            f"unsupported image format (first bytes {head[:8].hex(' ')}): "
            "expected PNG, JPEG, WebP or BMP"
        )
    if width <= 0 or height <= 0:
        raise ImageError(f"invalid {kind.upper()}: it declares a size of {width}x{height}")
    return kind, width, height


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} ({width * height:,} pixels), "
            f"over the limit of {max_pixels:,} pixels"
        )


def decode_image(
    data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS
) -> RGBImage:
    """Decode PNG, JPEG, WebP or BMP bytes into a C-contiguous RGB ``uint8`` array (H x W x 3).

    The size declared in the header is checked against ``max_pixels`` before anything is decoded,
    and the decoded array again. Raises :class:`ImageError` for empty, unsupported, undecodable
    or oversized data.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, not {max_pixels}")
    kind, width, height = image_size(data)
    _check_pixels(width, height, max_pixels, f"the {kind.upper()} image")
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        # IMREAD_COLOR: 8-bit, 3 channels (gray expanded, alpha dropped, 16-bit scaled down),
        # EXIF orientation applied. Its output is BGR.
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageError(f"could not decode the {kind.upper()} image: {exc}") from exc
    if bgr is None:
        raise ImageError(f"could not decode the {kind.upper()} image: corrupt or truncated data")
    rows, cols = bgr.shape[:2]
    _check_pixels(cols, rows, max_pixels, "the decoded image")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return np.asarray(rgb, dtype=np.uint8)


# --- detection ------------------------------------------------------------------------------------

_mediapipe_face_detection: ModuleType | None = None
_import_lock = threading.Lock()


def _face_detection_module() -> ModuleType:
    """``mediapipe.python.solutions.face_detection``, imported on first use (about a second)."""
    global _mediapipe_face_detection
    with _import_lock:
        if _mediapipe_face_detection is None:
            from mediapipe.python.solutions import face_detection

            _mediapipe_face_detection = face_detection
        return _mediapipe_face_detection


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, float(value)))


def _check_confidence(value: float, name: str = "min_confidence") -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # NaN included
        raise ValueError(f"{name} must be between 0 and 1, not {value}")
    return value


def _convert(detection: Any) -> FaceDetection:
    """A ``mediapipe.framework.formats.detection_pb2.Detection`` as a :class:`FaceDetection`."""
    location = detection.location_data
    box = location.relative_bounding_box
    x0, y0 = _clamp(box.xmin), _clamp(box.ymin)
    x1, y1 = _clamp(box.xmin + box.width), _clamp(box.ymin + box.height)
    keypoints = tuple(
        Keypoint(name, _clamp(point.x), _clamp(point.y))
        for name, point in zip(KEYPOINT_NAMES, location.relative_keypoints, strict=False)
    )
    score = float(detection.score[0]) if detection.score else 0.0
    return FaceDetection(x0, y0, x1 - x0, y1 - y0, score, keypoints)


def _check_rgb(rgb: object) -> RGBImage:
    if not isinstance(rgb, np.ndarray):
        raise ImageError(f"expected a NumPy array, not {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"expected an RGB image of shape (height, width, 3), not {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ImageError(f"expected an RGB image of dtype uint8, not {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        # MediaPipe fails on an empty image and its graph stays broken afterwards.
        raise ImageError(f"empty image of shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


class FaceDetector:
    """MediaPipe face detection: ``model_selection`` 0 is the short-range model (faces within
    about 2 m, filling a fair part of the frame), 1 the full-range model (within about 5 m;
    better for small or several faces). Faces scoring below ``min_confidence`` are dropped.

    Thread-safe; usable as a context manager; :meth:`close` releases the graph.
    """

    def __init__(self, model_selection: int = 0, min_confidence: float = 0.5) -> None:
        if model_selection not in MODEL_SELECTIONS:
            raise ValueError(f"model_selection must be 0 or 1, not {model_selection!r}")
        self.model_selection = model_selection
        self.min_confidence = _check_confidence(min_confidence)
        self._lock = threading.Lock()
        self._solution: Any = self._new_solution()

    def _new_solution(self) -> Any:
        module = _face_detection_module()
        return module.FaceDetection(
            min_detection_confidence=self.min_confidence, model_selection=self.model_selection
        )

    @property
    def closed(self) -> bool:
        return self._solution is None

    def detect(self, rgb: RGBImage, min_confidence: float | None = None) -> list[FaceDetection]:
        """The faces in ``rgb`` (H x W x 3 ``uint8``, RGB order), best score first.

        ``min_confidence``, when given, filters further for this call; it cannot go below the
        detector's own threshold, which the graph has already applied (``ValueError``).
        Raises :class:`ImageError` for a wrong array, :class:`DetectionError` if MediaPipe fails,
        ``RuntimeError`` once closed.
        """
        threshold = self.min_confidence
        if min_confidence is not None:
            threshold = _check_confidence(min_confidence)
            if threshold < self.min_confidence:
                raise ValueError(
                    f"min_confidence {threshold} is below this detector's threshold "
                    f"{self.min_confidence}; create a FaceDetector with a lower min_confidence"
                )
        image = _check_rgb(rgb)
        with self._lock:
            if self._solution is None:
                raise RuntimeError("this FaceDetector is closed")
            try:
                results = self._solution.process(image)
            except RuntimeError as exc:
                # A failed MediaPipe graph rejects every later packet: start a fresh one.
                self._replace_solution()
                raise DetectionError(f"face detection failed: {exc}") from exc
            found = [_convert(detection) for detection in results.detections or ()]
        found = [face for face in found if face.score >= threshold]
        found.sort(key=lambda face: face.score, reverse=True)
        return found

    def _replace_solution(self) -> None:
        old, self._solution = self._solution, None
        with contextlib.suppress(Exception):  # a failed graph's close re-raises its error
            old.close()
        self._solution = self._new_solution()

    def close(self) -> None:
        """Release the graph; waits for a detection in progress. Idempotent."""
        with self._lock:
            solution, self._solution = self._solution, None
        if solution is not None:
            solution.close()

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"FaceDetector(model_selection={self.model_selection}, "
            f"min_confidence={self.min_confidence}, {state})"
        )
