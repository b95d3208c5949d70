"""Small mask helpers shared by the core and the models."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def mask_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """Tight (x0, y0, x1, y1) box of a bool mask, exclusive ends; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
