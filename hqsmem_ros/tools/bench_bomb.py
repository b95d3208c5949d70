"""`python -m hqsmem_ros.tools.bench_bomb`: how fast and how cheaply a decompression bomb is refused.

A 12 KB JPEG whose frame header claims 60000x60000 pixels (10.8 GB as RGB) goes through the
decoder the node and `hqsmem bag` use (image_codec.decode_compressed, default pixel limit);
prints the time to refuse it and the process's RSS growth (current and peak).
"""
from __future__ import annotations

import argparse
import resource
import time

import cv2
import numpy as np
import psutil


def jpeg_claiming(width: int, height: int, pad_to: int = 0) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to claim width x height, padded
    with a comment segment to `pad_to` bytes: what a decompression bomb looks like."""
    ok, data = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    data = bytearray(data.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    if pad_to > len(data):
        body = b"x" * (pad_to - len(data) - 4)
        data[2:2] = b"\xff\xfe" + (len(body) + 2).to_bytes(2, "big") + body
    return bytes(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hqsmem_ros.tools.bench_bomb", description=__doc__)
    ap.add_argument("--size", default="60000x60000", help="size the header claims (WxH)")
    ap.add_argument("--bytes", type=int, default=12_000, help="size of the JPEG file")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    from hqsmem_ros.io.image_codec import ImageDecodeError, decode_compressed

    w, h = (int(v) for v in args.size.lower().split("x"))
    bomb = jpeg_claiming(w, h, args.bytes)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, reason = [], ""
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        try:
            decode_compressed("jpeg", bomb)
            reason = "DECODED (not refused)"
        except ImageDecodeError as exc:
            reason = str(exc)
        times.append(time.perf_counter() - t0)
    rss1 = proc.memory_info().rss
    peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"bomb: {len(bomb)} bytes JPEG claiming {w}x{h} ({w * h * 3 / 1e9:.1f} GB as RGB)")
    print(f"refused: {reason}")
    print(f"time to refuse: first {times[0] * 1000:.2f} ms, median {sorted(times)[len(times) // 2] * 1000:.2f} ms, "
          f"max {max(times) * 1000:.2f} ms over {len(times)}")
    print(f"RSS growth: {(rss1 - rss0) / 2**20:.1f} MB; peak RSS growth: {(peak1 - peak0) / 2**20:.1f} MB")
    _header_cost()
    return 0


def _header_cost() -> None:
    """What the check costs a real frame: the header read against the whole decode (1280x720)."""
    from hqsmem_ros.data.synth import make_sequence
    from hqsmem_ros.io.image_codec import compressed_size, decode_compressed, encode_compressed

    frame = make_sequence("bomb_bench", 0, (1280, 720), 1, 3)[0][0]
    for fmt, n in (("jpeg", 30), ("png", 10)):
        data = np.frombuffer(encode_compressed(frame, fmt), np.uint8)
        decode_compressed(fmt, data)
        t0 = time.perf_counter()
        for _ in range(20 * n):
            compressed_size(data)
        header = (time.perf_counter() - t0) / (20 * n)
        t0 = time.perf_counter()
        for _ in range(n):
            decode_compressed(fmt, data)
        whole = (time.perf_counter() - t0) / n
        print(f"1280x720 {fmt} ({data.size} bytes): header check {header * 1000:.3f} ms of "
              f"{whole * 1000:.2f} ms per decode ({100 * header / whole:.1f} %)")


if __name__ == "__main__":
    raise SystemExit(main())
