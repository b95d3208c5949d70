"""Reading and writing video-object-segmentation data in the DAVIS layout (no ROS needed).

Layouts understood (a "sequence" is one video):
- one sequence folder holding image files directly (frames ``*.jpg`` or labels ``*.png``);
- the project's shared layout: ``<seq>/JPEGImages/*.jpg`` and ``<seq>/Annotations/*.png``;
- the DAVIS root: ``<root>/JPEGImages/[480p/]<seq>/`` and ``<root>/Annotations/[480p/]<seq>/``;
- a folder of sequence folders in any of the first two forms (files that are not images, such as
  a README, are allowed beside the sequence folders).

Label images hold one object id per pixel, 0 = background. DAVIS 2017 stores them as palette
PNGs (the index is the id); DAVIS 2016 stores binary 'L' PNGs with 0 and 255, read here as id 1.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import cv2
import numpy as np
from PIL import Image

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
LABEL_EXTENSIONS = (".png",)
# DAVIS keeps resolutions in a level between Annotations/ and the sequence folders.
_RESOLUTION_DIRS = ("480p", "Full-Resolution", "1080p")


class DataError(ValueError):
    """Input data that cannot be used (missing, corrupt, wrong layout); the message names it."""


def davis_palette() -> np.ndarray:
    """256x3 uint8 palette used by DAVIS / PASCAL VOC: id bits spread over the RGB bit planes."""
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        code, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[index] = (red, green, blue)
    return palette


_PALETTE = davis_palette()


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def list_frames(frames_dir: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """Image files of one sequence folder, sorted by name.

    Hidden entries are skipped; any other entry that is not an image with one of `extensions`
    (a stray file or a sub-folder) is an error, so that no frame is skipped unnoticed.
    """
    folder = Path(frames_dir)
    if not folder.is_dir():
        raise DataError(f"not a folder: {folder}")
    exts = tuple(e.lower() for e in extensions)
    frames = []
    for entry in sorted(folder.iterdir()):
        if _is_hidden(entry):
            continue
        if entry.is_dir():
            raise DataError(f"unexpected sub-folder in a sequence folder: {entry}")
        if entry.suffix.lower() not in exts:
            raise DataError(f"not an image file ({', '.join(exts)} expected): {entry}")
        frames.append(entry)
    if not frames:
        raise DataError(f"no image files ({', '.join(exts)}) in {folder}")
    return frames


def list_labels(labels_dir: PathLike) -> List[Path]:
    """Label PNG files of one sequence folder, sorted by name (same rules as `list_frames`)."""
    return list_frames(labels_dir, LABEL_EXTENSIONS)


def read_frame(path: PathLike) -> np.ndarray:
    """One frame as an HxWx3 uint8 RGB array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"frame file not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"cannot decode image file (corrupt or unsupported): {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _rgb_to_ids(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map a colour-coded label image (DAVIS palette colours) back to ids."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    palette_codes = (_PALETTE[:, 0].astype(np.int32) << 16) | (_PALETTE[:, 1].astype(np.int32) << 8) | _PALETTE[:, 2]
    lookup = {int(c): i for i, c in enumerate(palette_codes)}
    colours, inverse = np.unique(codes.ravel(), return_inverse=True)
    ids = np.empty(len(colours), np.uint8)
    for k, colour in enumerate(colours):
        if int(colour) not in lookup:
            r, g, b = (int(colour) >> 16) & 255, (int(colour) >> 8) & 255, int(colour) & 255
            raise DataError(f"RGB label image has colour ({r},{g},{b}) that is not in the DAVIS palette: {path}")
        ids[k] = lookup[int(colour)]
    return ids[inverse].reshape(codes.shape)


def read_label(path: PathLike) -> np.ndarray:
    """Object-id label image (HxW uint8, or uint16 for 16-bit files); 0 = background.

    Palette ('P') PNGs give their indices, 'L' PNGs their values, 16-bit PNGs their values,
    RGB PNGs painted with the DAVIS palette the matching index. An 8-bit grey image whose only
    values are 0 and 255 follows the DAVIS 2016 binary convention and is read as object id 1.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.array(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read label image (corrupt or unsupported): {path}: {exc}") from exc
    if mode == "P":
        return array.astype(np.uint8, copy=False)
    if mode in ("L", "1"):
        label = array.astype(np.uint8)
        if mode == "1":
            return label
        values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
        if values.size and set(values.tolist()) <= {0, 255} and 255 in values:
            return (label == 255).astype(np.uint8)
        return label
    if mode.startswith("I"):
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise DataError(f"label image has values outside 0..65535: {path}")
        return array.astype(np.uint16)
    if mode in ("RGB", "RGBA"):
        return _rgb_to_ids(array[..., :3], path)
    raise DataError(f"unsupported label image mode {mode!r} (palette, grey or 16-bit PNG expected): {path}")


def write_label(path: PathLike, label: np.ndarray) -> None:
    """Write an HxW object-id label image as PNG, atomically.

    Ids up to 255 give a palette PNG with the DAVIS palette (viewable, and what DAVIS tools
    read); larger ids a 16-bit grey PNG. The file appears under its name only once complete.
    """
    path = Path(path)
    label = np.asarray(label)
    if label.ndim != 2:
        raise DataError(f"label for {path} must be a 2-D HxW array, got shape {label.shape}")
    if label.dtype == bool:
        label = label.astype(np.uint8)
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"label for {path} must hold integer object ids, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 65535):
        raise DataError(f"label for {path} has ids outside 0..65535")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not label.size or label.max() <= 255:
        image = Image.fromarray(label.astype(np.uint8), mode="P")
        image.putpalette(_PALETTE.ravel().tolist())
    else:
        image = Image.fromarray(label.astype(np.uint16))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def write_frame(path: PathLike, image_rgb: np.ndarray, jpeg_quality: int = 90) -> None:
    """Write an RGB uint8 frame (JPEG by extension, else PNG/BMP), atomically."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(f"unsupported frame file extension {ext!r}: {path}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise DataError(f"cannot encode frame for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(encoded.tobytes())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


# ---------------------------------------------------------------------------------------------
# Finding sequences


@dataclass(frozen=True)
class SequenceDirs:
    """Where one sequence's frames and labels are (either may be None when absent)."""

    name: str
    frames_dir: Optional[Path]
    labels_dir: Optional[Path]


def _has_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    return folder.is_dir() and any(
        e.is_file() and not _is_hidden(e) and e.suffix.lower() in extensions for e in folder.iterdir()
    )


def _subdirs(folder: Path) -> List[Path]:
    return sorted(e for e in folder.iterdir() if e.is_dir() and not _is_hidden(e))


def _davis_level(folder: Path) -> Path:
    """JPEGImages/ or Annotations/ of a DAVIS root, stepping into a resolution level if present."""
    for res in _RESOLUTION_DIRS:
        if (folder / res).is_dir() and not _has_images(folder):
            return folder / res
    return folder


def find_sequences(root: PathLike) -> List[SequenceDirs]:
    """The sequences under `root`: one sequence, a DAVIS root, or a folder of sequence folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    if _has_images(root):
        # A bare folder of images: it may be frames or (PNG only) labels; the caller knows which.
        png_only = all(p.suffix.lower() == ".png" for p in list_frames(root))
        return [SequenceDirs(root.name, root, root if png_only else None)]
    frames_root, labels_root = root / "JPEGImages", root / "Annotations"
    if frames_root.is_dir() or labels_root.is_dir():
        frames_level = _davis_level(frames_root) if frames_root.is_dir() else None
        labels_level = _davis_level(labels_root) if labels_root.is_dir() else None
        if (frames_level and _has_images(frames_level)) or (labels_level and _has_images(labels_level)):
            return [SequenceDirs(root.name, frames_level, labels_level)]  # <seq>/JPEGImages/*.jpg
        names = sorted({d.name for level in (frames_level, labels_level) if level for d in _subdirs(level)})
        sequences = [
            SequenceDirs(
                name,
                frames_level / name if frames_level and (frames_level / name).is_dir() else None,
                labels_level / name if labels_level and (labels_level / name).is_dir() else None,
            )
            for name in names
        ]
        if sequences:
            return sequences
        raise DataError(f"no sequence folders under {frames_root} or {labels_root}")
    sequences = []
    for sub in _subdirs(root):
        if _has_images(sub) or (sub / "JPEGImages").is_dir() or (sub / "Annotations").is_dir():
            found = find_sequences(sub)
            if len(found) != 1:
                raise DataError(f"expected one sequence in {sub}, found {len(found)}")
            sequences.append(SequenceDirs(sub.name, found[0].frames_dir, found[0].labels_dir))
        else:
            raise DataError(f"folder is neither a sequence nor holds image files: {sub}")
    if not sequences:
        raise DataError(f"no sequences (image folders, JPEGImages/ or Annotations/) under {root}")
    return sequences


def find_label_sequences(root: PathLike) -> Dict[str, Path]:
    """Sequence name -> folder of label PNGs, for any layout `find_sequences` understands."""
    root = Path(root)
    result = {}
    for seq in find_sequences(root):
        if seq.labels_dir is None:
            raise DataError(f"sequence {seq.name!r} under {root} has no label PNGs (Annotations/ folder)")
        result[seq.name] = seq.labels_dir
    return result
