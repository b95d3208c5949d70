"""Feature-gated proposal selection (HQ-SMem Eq. 8-9), pure numpy."""
from __future__ import annotations

import numpy as np


def select_proposals(base_emb: np.ndarray, prop_emb: np.ndarray, tau_verify: float):
    """base_emb (N,D), prop_emb (N,C,D) -> (chosen (N,) int, accept (N,) bool, best_cos (N,) float).

    p = argmax_c cos(phi(s^c), phi(y)) (Eq. 8); accept p only if that cosine is > tau (Eq. 9,
    strictly). Zero vectors (empty masks) have cosine 0 with everything; ties go to the lowest c.
    """
    base = np.asarray(base_emb, dtype=np.float64)
    props = np.asarray(prop_emb, dtype=np.float64)
    if base.ndim != 2 or props.ndim != 3 or props.shape[0] != base.shape[0] or props.shape[2] != base.shape[1]:
        raise ValueError(f"shapes must be (N,D) and (N,C,D), got {base.shape} and {props.shape}")
    bn = np.linalg.norm(base, axis=1, keepdims=True)
    pn = np.linalg.norm(props, axis=2, keepdims=True)
    b = np.divide(base, bn, out=np.zeros_like(base), where=bn > 0)
    p = np.divide(props, pn, out=np.zeros_like(props), where=pn > 0)
    cos = np.einsum("nd,ncd->nc", b, p)
    chosen = np.argmax(cos, axis=1) if cos.shape[1] else np.zeros(len(base), int)
    best = cos[np.arange(len(base)), chosen] if cos.shape[1] else np.zeros(len(base))
    return chosen, best > tau_verify, best
