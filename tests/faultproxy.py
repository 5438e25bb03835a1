# Moved to benchmarks/faultproxy.py (the soak benchmark needs it outside the tests); this
# re-export keeps `from tests.faultproxy import ...` working unchanged.
"""Re-export of :mod:`benchmarks.faultproxy`."""

from benchmarks.faultproxy import *  # noqa: F403
from benchmarks.faultproxy import MSG_BATCH, MSG_HEARTBEAT, FaultProxy, FrameFault, Stats

__all__ = ["MSG_BATCH", "MSG_HEARTBEAT", "FaultProxy", "FrameFault", "Stats"]
