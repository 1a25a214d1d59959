"""RDP curves of privacy events, cached: a curve is a pure function of its event, so it is
computed once per process (and stored beside the event in the ledger, keyed by the order set).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from privfed.privacy.events import ORDERS, event_from_json

# Which order set a stored curve is over: curves over another set are recomputed, not reused.
ORDERS_ID = hashlib.sha256(np.asarray(ORDERS, dtype=np.float64).tobytes()).hexdigest()[:16]


class CurveCache:
    """RDP curves over ORDERS by event JSON, shared by every ledger in the process (an LRU).
    The accountant service fills it from its pricing workers before a report reaches the
    ledger's transaction, so that the transaction never computes an expensive curve."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._curves: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, event_json: str) -> np.ndarray | None:
        with self._lock:
            curve = self._curves.get(event_json)
            if curve is not None:
                self._curves.move_to_end(event_json)
            return curve

    def put(self, event_json: str, curve: np.ndarray) -> np.ndarray:
        curve = np.array(curve, dtype=np.float64)  # a private, read-only copy
        curve.setflags(write=False)
        with self._lock:
            self._curves[event_json] = curve
            self._curves.move_to_end(event_json)
            while len(self._curves) > self.size:
                self._curves.popitem(last=False)
        return curve

    def curve(self, event_json: str) -> np.ndarray:
        """The cached curve, else computed here (and cached)."""
        cached = self.get(event_json)
        return cached if cached is not None else self.put(event_json, _compute(event_json))


def _compute(event_json: str) -> np.ndarray:
    return event_from_json(event_json).rdp()


CURVES = CurveCache()
