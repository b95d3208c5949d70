"""sensor_msgs image encodings <-> numpy, without ROS (hqsmem_ros.io.image_codec).

Each encoding is built here from a known RGB image by the encoding's own definition (byte
order, chroma subsampling, Bayer pattern) and decoded back.
"""
import cv2
import numpy as np
import pytest

from hqsmem_ros.io import image_codec as ic
from hqsmem_ros.io.image_codec import ImageDecodeError


def _known_rgb(h=48, w=64):
    """A smooth colour image (demosaicing and chroma subsampling are exact enough on it)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([40 + 3 * x, 30 + 4 * y, 200 - 2 * x - y], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _decode(encoding, pixels, step=None, bigendian=False, pad_value=0xAB):
    """Pack `pixels` rows (any dtype) into a message buffer with optional row padding."""
    h, w = pixels.shape[:2]
    row = pixels.reshape(h, -1).view(np.uint8).reshape(h, -1)
    step = step or row.shape[1]
    buf = np.full((h, step), pad_value, np.uint8)
    buf[:, :row.shape[1]] = row
    return ic.decode_image(encoding, h, w, step, bigendian, buf.tobytes())


def test_rgb8_bgr8_rgba8_bgra8_are_exact():
    rgb = _known_rgb()
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    assert np.array_equal(_decode("rgb8", rgb), rgb)
    assert np.array_equal(_decode("bgr8", rgb[..., ::-1].copy()), rgb)
    assert np.array_equal(_decode("rgba8", np.concatenate([rgb, alpha], -1)), rgb)
    assert np.array_equal(_decode("bgra8", np.concatenate([rgb[..., ::-1], alpha], -1)), rgb)


def test_padded_rows_are_skipped():
    rgb = _known_rgb()
    out = _decode("bgr8", rgb[..., ::-1].copy(), step=rgb.shape[1] * 3 + 13)
    assert np.array_equal(out, rgb)


def test_mono8_and_mono16_both_byte_orders():
    gray = _known_rgb()[..., 1]
    want = np.repeat(gray[..., None], 3, axis=2)
    assert np.array_equal(_decode("mono8", gray), want)
    assert np.array_equal(_decode("8UC1", gray), want)
    wide = gray.astype(np.uint16) * 257  # top byte == gray
    assert np.array_equal(_decode("mono16", wide.astype("<u2")), want)
    assert np.array_equal(_decode("16UC1", wide.astype(">u2"), bigendian=True), want)
    # the same bytes read with the wrong byte order are a different image
    assert not np.array_equal(_decode("mono16", (wide + 3).astype(">u2"), bigendian=False), want)


def _yuv422(rgb, order):
    """Pack RGB as 4:2:2 YUV (BT.601 video range, as cameras send it) in the given byte order."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u_full = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v_full = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    u = (u_full[:, 0::2] + u_full[:, 1::2]) / 2
    v = (v_full[:, 0::2] + v_full[:, 1::2]) / 2
    h, w = y.shape
    out = np.zeros((h, w // 2, 4), np.float32)
    parts = {"Y0": y[:, 0::2], "Y1": y[:, 1::2], "U": u, "V": v}
    for i, name in enumerate(order):
        out[..., i] = parts[name]
    return np.clip(np.round(out), 0, 255).astype(np.uint8).reshape(h, w, 2)


@pytest.mark.parametrize("encoding,order", [
    ("yuv422", ("U", "Y0", "V", "Y1")), ("uyvy", ("U", "Y0", "V", "Y1")),
    ("yuv422_yuy2", ("Y0", "U", "Y1", "V")), ("yuyv", ("Y0", "U", "Y1", "V")),
])
def test_yuv422_variants(encoding, order):
    rgb = _known_rgb()
    out = _decode(encoding, _yuv422(rgb, order))
    err = np.abs(out.astype(int) - rgb.astype(int))
    assert err.mean() < 3 and err.max() < 20, (err.mean(), err.max())


def _bayer(rgb, pattern):
    """Mosaic: pattern names the colours of the top-left 2x2 block, row by row."""
    idx = {"R": 0, "G": 1, "B": 2}
    out = np.zeros(rgb.shape[:2], np.uint8)
    for k, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, idx[pattern[k]]]
    return out


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR", "GBRG", "GRBG"])
def test_bayer_patterns(pattern):
    rgb = _known_rgb()
    out = _decode(f"bayer_{pattern.lower()}8", _bayer(rgb, pattern))
    inner = (slice(2, -2), slice(2, -2))  # demosaicing borders are approximate
    err = np.abs(out[inner].astype(int) - rgb[inner].astype(int))
    assert err.mean() < 3, err.mean()


def test_unknown_encoding_lists_the_supported_ones():
    with pytest.raises(ImageDecodeError) as e:
        ic.decode_image("rgb16", 2, 2, 12, False, bytes(24))
    msg = str(e.value)
    assert "'rgb16'" in msg and "bayer_rggb8" in msg and "yuv422" in msg


@pytest.mark.parametrize("args,words", [
    (("rgb8", 4, 4, 11, False, bytes(44)), ["step 11", "4*3 = 12"]),
    (("rgb8", 4, 4, 12, False, bytes(47)), ["truncated", "47 bytes", "48"]),
    (("rgb8", 4, 4, 12, False, bytes(49)), ["size mismatch", "49 bytes"]),
    (("mono16", 4, 4, 9, False, bytes(36)), ["step 9"]),
    (("yuv422", 2, 3, 6, False, bytes(12)), ["even width"]),
    (("mono8", 0, 4, 4, False, b""), ["empty"]),
    (("rgb8", 4, 4, 12, False, b""), ["truncated", "0 bytes"]),
])
def test_bad_sizes_are_clear_errors(args, words):
    with pytest.raises(ImageDecodeError) as e:
        ic.decode_image(*args)
    assert isinstance(e.value, ValueError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_label_map_round_trip_as_mono16():
    labels = np.zeros((30, 40), np.uint16)
    labels[5:10, 5:20] = 3
    labels[20:, 30:] = 1000  # ids above 255 survive
    f = ic.label_map_to_fields(labels)
    assert (f["encoding"], f["height"], f["width"], f["step"]) == ("mono16", 30, 40, 80)
    back = ic.decode_mask(f["encoding"], f["height"], f["width"], f["step"], f["is_bigendian"], f["data"])
    assert back.dtype == np.uint16 and np.array_equal(back, labels)


def test_rgb_round_trip_as_rgb8():
    rgb = _known_rgb()
    f = ic.rgb_to_fields(rgb)
    assert (f["encoding"], f["step"]) == ("rgb8", rgb.shape[1] * 3)
    assert np.array_equal(
        ic.decode_image(f["encoding"], f["height"], f["width"], f["step"], f["is_bigendian"], f["data"]), rgb)


def test_encode_rejects_wrong_arrays():
    with pytest.raises(ValueError, match="mono16"):
        ic.label_map_to_fields(np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="RGB"):
        ic.rgb_to_fields(np.zeros((4, 4), np.uint8))


def test_mask_rejects_colour_encodings():
    with pytest.raises(ImageDecodeError, match="mono8"):
        ic.decode_mask("rgb8", 2, 2, 6, False, bytes(12))


def test_compressed_round_trips():
    rgb = _known_rgb()
    assert np.array_equal(ic.decode_compressed("png", ic.encode_compressed(rgb, "png")), rgb)
    jpg = ic.decode_compressed("rgb8; jpeg compressed bgr8", ic.encode_compressed(rgb, "jpeg", 95))
    assert np.abs(jpg.astype(int) - rgb.astype(int)).mean() < 3


@pytest.mark.parametrize("fmt,data,words", [
    ("jpeg", b"\xff\xd8\xff\xe0 not really a jpeg", ["corrupt", "'jpeg'"]),
    ("png", b"", ["empty"]),
    ("16UC1; compressedDepth png", b"\x00" * 20, ["depth"]),
    ("webp2000", b"\x00" * 20, ["unsupported", "jpeg, png"]),
])
def test_bad_compressed_images(fmt, data, words):
    with pytest.raises(ImageDecodeError) as e:
        ic.decode_compressed(fmt, data)
    for w in words:
        assert w in str(e.value)


def _jpeg_variants():
    """JPEGs as cameras and encoders write them: 4:2:0, 4:2:2, 4:4:4, progressive, greyscale,
    and sizes that are not whole 16-pixel blocks."""
    rng = np.random.default_rng(3)
    bgr = cv2.GaussianBlur((rng.random((61, 83, 3)) * 255).astype(np.uint8), (5, 5), 1.5)
    sampling = cv2.IMWRITE_JPEG_SAMPLING_FACTOR
    first = None
    for name, img, params in [
            ("420", bgr, []),
            ("422", bgr, [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]),
            ("444", bgr, [sampling, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]),
            ("progressive", bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
            ("grey", bgr[:, :, 1], [])]:
        ok, data = cv2.imencode(".jpg", img, params)
        assert ok
        first = data.tobytes() if first is None else first
        yield name, data.tobytes()
    yield "cut off", first[: len(first) * 2 // 3]


def test_jpeg_decoder_is_the_fast_one_and_gives_opencvs_pixels(monkeypatch):
    """The test environment installs simplejpeg (setup.py), so this checks the path robots take
    with it against OpenCV's decoder, the path without it: same pixels, every variant."""
    assert ic.jpeg_decoder().startswith("simplejpeg")
    def decode(data):  # pixels, or the refusal (OpenCV's version decides whether a cut-off
        try:           # JPEG is decoded as far as it goes or refused; both paths must agree)
            return ic.decode_compressed("jpeg", data)
        except ImageDecodeError as exc:
            return str(exc)

    fast = {name: decode(data) for name, data in _jpeg_variants()}
    monkeypatch.setattr(ic, "_simplejpeg", None)
    assert ic.jpeg_decoder().startswith("OpenCV")
    for name, data in _jpeg_variants():
        slow = decode(data)
        if name == "cut off" and isinstance(slow, str):
            assert fast[name] == slow
            continue
        assert fast[name].shape == slow.shape == (61, 83, 3) and fast[name].dtype == np.uint8, name
        assert np.array_equal(fast[name], slow), name


def test_jpeg_that_the_fast_decoder_refuses_goes_to_opencv(monkeypatch):
    calls = []

    class Refusing:  # stands in for simplejpeg on a JPEG kind it cannot convert (e.g. CMYK)
        __version__ = "test"

        @staticmethod
        def decode_jpeg(*args, **kwargs):
            calls.append(1)
            raise ValueError("Unsupported color conversion request")

    rgb = _known_rgb()
    data = ic.encode_compressed(rgb, "jpeg", 95)
    expected = ic.decode_compressed("jpeg", data)
    monkeypatch.setattr(ic, "_simplejpeg", Refusing)
    assert np.array_equal(ic.decode_compressed("jpeg", data), expected) and calls == [1]
    with pytest.raises(ImageDecodeError, match="corrupt"):
        ic.decode_compressed("jpeg", b"\xff\xd8\xff\xe0 not really a jpeg")
    assert calls == [1]  # refused from its header: no decoder is called


def test_truncated_jpeg_is_refused_or_decoded_to_the_right_size():
    """OpenCV may decode a cut-off JPEG partially; it must never come back with another size."""
    rgb = _known_rgb()
    data = ic.encode_compressed(rgb, "jpeg")
    try:
        out = ic.decode_compressed("jpeg", data[: len(data) // 3])
    except ImageDecodeError:
        return
    assert out.shape == rgb.shape


def test_message_helpers_accept_array_data():
    """rclpy gives uint8[] fields as array('B'); the helpers work on any object with the fields."""
    import array

    class Msg:  # the attributes of sensor_msgs/Image that the helpers read and write
        pass

    rgb = _known_rgb()
    msg = ic.fill_image_msg(Msg(), ic.rgb_to_fields(rgb))
    assert isinstance(msg.data, array.array) and msg.data.typecode == "B"
    assert np.array_equal(ic.image_to_rgb(msg), rgb)
    msg.encoding = "32FC1"  # rgb8 data: wrong for it with or without cv_bridge
    with pytest.raises(ImageDecodeError, match="32FC1"):
        ic.image_to_rgb(msg)


def test_fill_from_pixels_matches_encode_image_and_reuses_its_buffer():
    class Msg:
        pass

    labels = np.zeros((30, 40), np.uint16)
    labels[5:10, 5:20] = 3
    labels[20:, 30:] = 1000
    first = ic.fill_image_msg_from_pixels(Msg(), labels, "mono16")
    ref = ic.encode_image(labels, "mono16")
    assert bytes(first.data) == ref["data"]
    assert all(getattr(first, k) == ref[k] for k in ("encoding", "height", "width", "step", "is_bigendian"))
    # the next frame of the same size goes into the same array; the first message was published
    labels2 = labels[::-1].copy()
    second = ic.fill_image_msg_from_pixels(Msg(), labels2, "mono16", reuse=first.data)
    assert second.data is first.data and np.array_equal(ic.mask_from_msg(second), labels2)
    # another size: a new array, the old one is left alone
    third = ic.fill_image_msg_from_pixels(Msg(), labels[:10], "mono16", reuse=second.data)
    assert third.data is not second.data and np.array_equal(ic.mask_from_msg(third), labels[:10])
    rgb = _known_rgb()[:, ::-1]  # not contiguous
    assert np.array_equal(ic.image_to_rgb(ic.fill_image_msg_from_pixels(Msg(), rgb, "rgb8")), rgb)
    with pytest.raises(ValueError, match="mono16"):
        ic.fill_image_msg_from_pixels(Msg(), labels.astype(np.int32), "mono16")


def _png_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_the_header():
    from hqsmem_ros.tools.bench_bomb import jpeg_claiming
    bomb = jpeg_claiming(60000, 60000, pad_to=12_000)
    assert 11_000 < len(bomb) < 13_000
    assert ic.compressed_size(np.frombuffer(bomb, np.uint8)) == ("jpeg", 60000, 60000)
    with pytest.raises(ImageDecodeError, match=r"60000x60000 = 3600000000 pixels exceeds the limit"):
        ic.decode_compressed("jpeg", bomb)
    with pytest.raises(ImageDecodeError, match="PNG image .*30000x30000"):
        ic.decode_compressed("png", _png_claiming(30000, 30000))
    # a limit of its own: a real 640x480 JPEG is refused under 300000 pixels, decoded above
    real = ic.encode_compressed(np.zeros((480, 640, 3), np.uint8), "jpeg")
    with pytest.raises(ImageDecodeError, match="640x480 = 307200 pixels exceeds the limit of 300000"):
        ic.decode_compressed("jpeg", real, max_pixels=300_000)
    assert ic.decode_compressed("jpeg", real, max_pixels=307_200).shape == (480, 640, 3)


def test_other_formats_in_a_compressed_message_are_refused():
    """OpenCV would decode TIFF, WebP, BMP... whatever the format field says; their sizes are
    not checked here, so they are refused (the node accepts JPEG and PNG)."""
    ok, bmp = cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))
    assert ok
    with pytest.raises(ImageDecodeError, match="not a JPEG or PNG"):
        ic.decode_compressed("jpeg", bmp.tobytes())


def test_raw_image_over_the_pixel_limit_or_with_an_implausible_step_is_refused():
    with pytest.raises(ImageDecodeError, match="100x100 = 10000 pixels exceeds the limit of 9999"):
        ic.decode_image("rgb8", 100, 100, 300, False, b"\x00" * 30000, max_pixels=9999)
    # 1 row of 10 pixels, step 1 GB: inconsistent long before the data is looked at
    with pytest.raises(ImageDecodeError, match="implausible step"):
        ic.decode_image("mono8", 1, 10, 1 << 30, False, b"\x00" * 10)
    # the default limit applies to the message helper too
    class Msg:
        encoding, height, width, step, is_bigendian, data = "mono8", 60000, 60000, 60000, False, b""
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        ic.image_to_rgb(Msg())
