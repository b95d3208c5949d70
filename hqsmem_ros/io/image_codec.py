"""sensor_msgs/Image and CompressedImage <-> numpy, without ROS.

The node uses this module for every image it receives and publishes. It needs only numpy and
OpenCV, so it is tested (and usable) where ROS is not installed. The conversions use the same
OpenCV colour conversion codes as ROS's cv_bridge, so results match it; where cv_bridge is
installed it is used only for encodings this module does not know (see ``image_to_rgb``).
JPEGs are decoded with simplejpeg (libjpeg-turbo's TurboJPEG API) when it is installed: the same
pixels as OpenCV's decoder, 15-23 % faster than the opencv-python wheels' (docs/benchmarks.md).

All decoders return HxWx3 uint8 RGB arrays, the pipeline's input format.
Bad input raises ``ImageDecodeError`` (a ValueError) whose message says what is wrong.
"""
from __future__ import annotations

import array
import io
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np
# Header parsers for the size check before decoding (imported here, not on the first frame: the
# first refusal must be as quick as the others).
from PIL import JpegImagePlugin, PngImagePlugin

try:  # optional: a faster JPEG decoder with OpenCV's output (see decode_compressed)
    import simplejpeg as _simplejpeg
except ImportError:  # e.g. a robot that installed only the apt packages
    _simplejpeg = None


class ImageDecodeError(ValueError):
    """An image message that cannot be turned into pixels (encoding, size, data)."""


@dataclass(frozen=True)
class _Layout:
    channels: int
    dtype: np.dtype
    # OpenCV conversion of the raw (h, w[, c]) array to RGB; None = handled in code below.
    to_rgb: Optional[int]


_U8 = np.dtype(np.uint8)
_U16 = np.dtype(np.uint16)

# ROS encoding name -> memory layout. Bayer codes: OpenCV names a Bayer pattern by the 2x2
# block starting at the second row and column, so ROS's bayer_rggb8 is OpenCV's BayerBG
# (the same mapping cv_bridge uses).
_LAYOUTS: Dict[str, _Layout] = {
    "rgb8": _Layout(3, _U8, None),
    "bgr8": _Layout(3, _U8, cv2.COLOR_BGR2RGB),
    "rgba8": _Layout(4, _U8, cv2.COLOR_RGBA2RGB),
    "bgra8": _Layout(4, _U8, cv2.COLOR_BGRA2RGB),
    "mono8": _Layout(1, _U8, cv2.COLOR_GRAY2RGB),
    "8UC1": _Layout(1, _U8, cv2.COLOR_GRAY2RGB),
    "mono16": _Layout(1, _U16, None),
    "16UC1": _Layout(1, _U16, None),
    "yuv422": _Layout(2, _U8, cv2.COLOR_YUV2RGB_UYVY),  # U0 Y0 V0 Y1
    "uyvy": _Layout(2, _U8, cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": _Layout(2, _U8, cv2.COLOR_YUV2RGB_YUY2),  # Y0 U0 Y1 V0
    "yuyv": _Layout(2, _U8, cv2.COLOR_YUV2RGB_YUY2),
    "bayer_rggb8": _Layout(1, _U8, cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": _Layout(1, _U8, cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": _Layout(1, _U8, cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": _Layout(1, _U8, cv2.COLOR_BayerGB2RGB),
}

SUPPORTED_ENCODINGS: Tuple[str, ...] = tuple(_LAYOUTS)
MASK_ENCODINGS: Tuple[str, ...] = ("mono8", "8UC1", "mono16", "16UC1")

_HOST_BIG_ENDIAN = sys.byteorder == "big"

# Largest image (width x height) decoded by default: 40 megapixels (an 8K frame is 33), 120 MB as
# RGB. Sizes come from the message fields (raw) or the file header (compressed) and are checked
# BEFORE any pixel is decoded, so a 12 KB JPEG that claims 60000x60000 costs no memory.
DEFAULT_MAX_PIXELS = 40_000_000
# Row padding accepted in raw images beyond the pixels themselves (alignment is at most a page).
_MAX_ROW_PADDING = 4096


def _check_pixels(what: str, width: int, height: int, max_pixels: Optional[int]) -> None:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if width * height > limit:
        raise ImageDecodeError(
            f"{what} of {width}x{height} = {width * height} pixels exceeds the limit of {limit} "
            "pixels (max_image_pixels); refused before decoding")


def _unsupported(encoding: str) -> ImageDecodeError:
    return ImageDecodeError(
        f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}"
        + (" (more with cv_bridge installed)" if _cv_bridge() is None else ""))


def _byte_array(data: Any) -> np.ndarray:
    """A message's data (bytes, array('B'), memoryview, or a list of ints) as a uint8 view."""
    if data is None or len(data) == 0:
        return np.empty(0, np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).ravel()


def raw_pixels(encoding: str, height: int, width: int, step: int, is_bigendian: bool,
               data: Any, allowed: Optional[Tuple[str, ...]] = None,
               max_pixels: Optional[int] = None) -> np.ndarray:
    """The message's pixels as an (h, w) or (h, w, c) array in the encoding's own layout.

    Checks the size fields against each other, against ``max_pixels`` (default
    DEFAULT_MAX_PIXELS) and against the data; never copies more than needed (a view of
    ``data`` when rows are not padded and no byte swap is needed).
    """
    allowed = allowed or SUPPORTED_ENCODINGS
    layout = _LAYOUTS.get(encoding)
    if layout is None or encoding not in allowed:
        if allowed is SUPPORTED_ENCODINGS:
            raise _unsupported(encoding)
        raise ImageDecodeError(
            f"unsupported encoding {encoding!r} here; expected one of: {', '.join(allowed)}")
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"empty {encoding} image: {width}x{height} pixels")
    _check_pixels(f"{encoding} image", width, height, max_pixels)
    if layout.to_rgb in (cv2.COLOR_YUV2RGB_UYVY, cv2.COLOR_YUV2RGB_YUY2) and width % 2:
        raise ImageDecodeError(f"{encoding} needs an even width (two pixels share U and V), got {width}")
    if encoding.startswith("bayer_") and (width < 2 or height < 2):
        raise ImageDecodeError(f"{encoding} image too small to demosaic: {width}x{height}")
    row_bytes = width * layout.channels * layout.dtype.itemsize
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} is smaller than width*bytes_per_pixel = {width}*"
            f"{layout.channels * layout.dtype.itemsize} = {row_bytes} for {encoding}")
    if step > row_bytes + max(row_bytes, _MAX_ROW_PADDING):
        raise ImageDecodeError(
            f"implausible step {step} for a {width} pixels wide {encoding} image (rows of "
            f"{row_bytes} bytes; more than {max(row_bytes, _MAX_ROW_PADDING)} bytes of padding)")
    if step % layout.dtype.itemsize:
        raise ImageDecodeError(f"step {step} is not a multiple of {layout.dtype.itemsize} for {encoding}")
    buf = _byte_array(data)
    expected = step * height
    if buf.size < expected:
        raise ImageDecodeError(
            f"truncated {encoding} image: {buf.size} bytes of data, step*height = "
            f"{step}*{height} = {expected} expected")
    if buf.size > expected:
        raise ImageDecodeError(
            f"size mismatch in {encoding} image: {buf.size} bytes of data, step*height = "
            f"{step}*{height} = {expected} expected")
    rows = buf.reshape(height, step)[:, :row_bytes]
    dtype = layout.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if is_bigendian else "<")
    pixels = rows.view(dtype) if rows.flags.c_contiguous else np.ascontiguousarray(rows).view(dtype)
    shape = (height, width) if layout.channels == 1 else (height, width, layout.channels)
    pixels = pixels.reshape(shape)
    if dtype.itemsize > 1 and not dtype.isnative:
        pixels = pixels.astype(dtype.newbyteorder("="))
    return pixels


def decode_image(encoding: str, height: int, width: int, step: int, is_bigendian: bool,
                 data: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/Image fields -> HxWx3 uint8 RGB (16-bit images keep their top 8 bits)."""
    pixels = raw_pixels(encoding, height, width, step, is_bigendian, data, max_pixels=max_pixels)
    layout = _LAYOUTS[encoding]
    if layout.dtype == _U16:
        pixels = (pixels >> 8).astype(np.uint8)
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    if layout.to_rgb is None:  # rgb8
        return np.ascontiguousarray(pixels)
    if layout.channels > 1 and not pixels.flags.c_contiguous:
        pixels = np.ascontiguousarray(pixels)
    return cv2.cvtColor(pixels, layout.to_rgb)


def decode_mask(encoding: str, height: int, width: int, step: int, is_bigendian: bool,
                data: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """A mask or label image (mono8/8UC1/mono16/16UC1) -> HxW uint8 or uint16 array."""
    return np.ascontiguousarray(
        raw_pixels(encoding, height, width, step, is_bigendian, data, allowed=MASK_ENCODINGS,
                   max_pixels=max_pixels))


_COMPRESSED_KINDS = ("jpeg", "jpg", "png")
_JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker and the first segment's marker
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def jpeg_decoder() -> str:
    """The library that decodes JPEGs here (printed by `hqsmem bag`, reported by the node)."""
    if _simplejpeg is not None:
        return f"simplejpeg {getattr(_simplejpeg, '__version__', '?')}"
    return f"OpenCV {cv2.__version__}"


def compressed_size(buf: np.ndarray, fmt: str = "") -> Tuple[str, int, int]:
    """(kind, width, height) of JPEG or PNG data, read from its header without decoding.

    Pillow's JPEG and PNG readers parse only the header (JPEG markers up to the frame header,
    PNG's IHDR); they are called directly, not through Image.open, whose own bomb check would
    hide the size. Data of any other kind (which OpenCV would decode too, e.g. TIFF or WebP,
    with size fields of their own) is refused.
    """
    head = buf[:8].tobytes()
    reader = (JpegImagePlugin.JpegImageFile if head.startswith(_JPEG_MAGIC)
              else PngImagePlugin.PngImageFile if head == _PNG_MAGIC else None)
    try:
        if reader is None:
            raise ValueError("unknown signature " + head.hex())
        with reader(io.BytesIO(buf.tobytes())) as im:
            return im.format.lower(), int(im.size[0]), int(im.size[1])
    except Exception as exc:  # SyntaxError (Pillow's "not a JPEG file"), a header cut short, ...
        raise ImageDecodeError(
            f"corrupt or undecodable compressed image (format {fmt!r}, {buf.size} bytes): not a "
            f"JPEG or PNG, or its header is damaged ({type(exc).__name__}: {exc})") from exc


def decode_compressed(fmt: str, data: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/CompressedImage (format, data) -> HxWx3 uint8 RGB.

    ``format`` is as image_transport writes it: "jpeg", "png", or "bgr8; jpeg compressed bgr8".
    The size in the header is checked against ``max_pixels`` (default DEFAULT_MAX_PIXELS)
    before anything is decoded.
    """
    fmt_l = (fmt or "").lower()
    if "compresseddepth" in fmt_l:
        raise ImageDecodeError(
            f"compressed depth images ({fmt!r}) are not camera images; subscribe to the colour image")
    if fmt_l and not any(kind in fmt_l for kind in _COMPRESSED_KINDS):
        raise ImageDecodeError(
            f"unsupported compressed image format {fmt!r}; supported: jpeg, png")
    buf = _byte_array(data)
    if buf.size == 0:
        raise ImageDecodeError(f"empty compressed image (format {fmt!r})")
    kind, width, height = compressed_size(buf, fmt)
    _check_pixels(f"{kind.upper()} image (size from its header)", width, height, max_pixels)
    if _simplejpeg is not None and buf[:3].tobytes() == _JPEG_MAGIC:
        try:
            return _simplejpeg.decode_jpeg(buf, colorspace="RGB", strict=True)
        except ValueError:
            # Cut-off or damaged data (strict: any libjpeg warning) and kinds it cannot convert
            # (CMYK): OpenCV decides, so the result never depends on which decoder is installed.
            pass
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise ImageDecodeError(
            f"corrupt or undecodable compressed image (format {fmt!r}, {buf.size} bytes)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """HxWx3 uint8 RGB -> jpeg/png bytes (for publishers of sensor_msgs/CompressedImage)."""
    _check_rgb(rgb)
    ext = {"jpeg": ".jpg", "jpg": ".jpg", "png": ".png"}.get(fmt.lower())
    if ext is None:
        raise ValueError(f"unsupported compressed format {fmt!r}; supported: jpeg, png")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if ext == ".jpg" else []
    ok, out = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {rgb.shape} image as {fmt}")
    return out.tobytes()


def _check_rgb(rgb: np.ndarray) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got "
                         f"{getattr(rgb, 'dtype', type(rgb))} {getattr(rgb, 'shape', '')}")


def encode_image(pixels: np.ndarray, encoding: str) -> Dict[str, Any]:
    """numpy -> sensor_msgs/Image fields (dict: encoding, height, width, step, is_bigendian, data).

    ``pixels`` must already be in the encoding's layout (HxWx3 uint8 for rgb8/bgr8, HxW uint16
    for mono16, ...); 16-bit data is written in the host's byte order, as cv_bridge does.
    """
    fields = _header_fields(pixels, encoding)
    fields["data"] = np.ascontiguousarray(pixels).tobytes()
    return fields


def _header_fields(pixels: np.ndarray, encoding: str) -> Dict[str, Any]:
    """encode_image()'s fields without the data, after checking `pixels` fits `encoding`."""
    layout = _LAYOUTS.get(encoding)
    if layout is None:
        raise ValueError(f"cannot encode {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)}")
    shape = pixels.shape
    want_ndim = 2 if layout.channels == 1 else 3
    if (pixels.dtype != layout.dtype or pixels.ndim != want_ndim
            or (want_ndim == 3 and shape[2] != layout.channels)):
        raise ValueError(f"{encoding} needs a {'HxW' if want_ndim == 2 else f'HxWx{layout.channels}'} "
                         f"{layout.dtype} array, got {pixels.dtype} {shape}")
    height, width = shape[:2]
    return {
        "encoding": encoding,
        "height": int(height),
        "width": int(width),
        "step": int(width * layout.channels * layout.dtype.itemsize),
        "is_bigendian": bool(_HOST_BIG_ENDIAN and layout.dtype.itemsize > 1),
    }


def label_map_to_fields(label_map: np.ndarray) -> Dict[str, Any]:
    """uint16 label image (pixel = object id, 0 = background) -> mono16 Image fields."""
    return encode_image(label_map, "mono16")


def rgb_to_fields(rgb: np.ndarray) -> Dict[str, Any]:
    """HxWx3 uint8 RGB -> rgb8 Image fields."""
    _check_rgb(rgb)
    return encode_image(rgb, "rgb8")


# ---- message-level helpers (duck-typed: any object with sensor_msgs/Image's fields) --------

def image_to_rgb(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/Image -> HxWx3 uint8 RGB.

    Encodings in SUPPORTED_ENCODINGS are converted here (identical with or without ROS).
    Others go to cv_bridge when it is installed (e.g. 32FC1, nv21 on a robot); without it they
    raise ImageDecodeError naming the supported encodings.
    """
    if msg.encoding in _LAYOUTS:
        return decode_image(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data,
                            max_pixels=max_pixels)
    if int(msg.width) > 0 and int(msg.height) > 0:
        _check_pixels(f"{msg.encoding} image", int(msg.width), int(msg.height), max_pixels)
    bridge = _cv_bridge()
    if bridge is None:
        raise _unsupported(msg.encoding)
    try:
        return np.ascontiguousarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
    except Exception as exc:  # cv_bridge raises CvBridgeError, cv2.error, TypeError...
        raise ImageDecodeError(f"cv_bridge cannot convert {msg.encoding!r} to rgb8: {exc}") from exc


def mask_from_msg(msg: Any) -> np.ndarray:
    """A mask/label sensor_msgs/Image -> HxW uint8/uint16 array."""
    return decode_mask(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)


def compressed_to_rgb(msg: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """sensor_msgs/CompressedImage -> HxWx3 uint8 RGB."""
    return decode_compressed(msg.format, msg.data, max_pixels=max_pixels)


def fill_image_msg(msg: Any, fields: Dict[str, Any]) -> Any:
    """Copy encode_image()'s fields into a sensor_msgs/Image (header left to the caller)."""
    msg.encoding = fields["encoding"]
    msg.height = fields["height"]
    msg.width = fields["width"]
    msg.step = fields["step"]
    msg.is_bigendian = fields["is_bigendian"]
    # rosidl's uint8[] setter takes array('B') without a per-element check; bytes -> array is
    # one memcpy.
    msg.data = array.array("B", fields["data"])
    return msg


def fill_image_msg_from_pixels(msg: Any, pixels: np.ndarray, encoding: str,
                               reuse: Optional[array.array] = None) -> Any:
    """Like ``fill_image_msg(msg, encode_image(pixels, encoding))``, for publishers in a hot loop.

    The pixels are copied once, straight into the message's array('B') data (encode_image makes
    a bytes copy first). With ``reuse`` (the array this function put in an earlier message, of
    the same size) nothing is allocated: a fresh megabyte-sized buffer costs page faults on
    every frame. Reuse only once the earlier message is published: rclpy copies a message
    into the middleware inside ``publish()``, so after it returns the array is free again.
    """
    fields = _header_fields(pixels, encoding)
    src = memoryview(np.ascontiguousarray(pixels)).cast("B")
    if reuse is not None and reuse.typecode == "B" and len(reuse) == src.nbytes:
        memoryview(reuse)[:] = src
        data = reuse
    else:
        data = array.array("B")
        data.frombytes(src)
    msg.encoding = fields["encoding"]
    msg.height = fields["height"]
    msg.width = fields["width"]
    msg.step = fields["step"]
    msg.is_bigendian = fields["is_bigendian"]
    msg.data = data
    return msg


_BRIDGE: Any = False  # False: not looked up yet; None: not installed


def _cv_bridge() -> Any:
    global _BRIDGE
    if _BRIDGE is False:
        try:
            from cv_bridge import CvBridge  # ROS 2's cv_bridge (apt), absent from PyPI
            _BRIDGE = CvBridge()
        except Exception:  # ImportError, or the ROS 1 PyPI package failing on import
            _BRIDGE = None
    return _BRIDGE
