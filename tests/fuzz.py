"""What the fuzz tests (tests/integration/test_fuzz_*.py) share: their bound and their
Hypothesis settings::

    from ..fuzz import EXAMPLES, fuzz_settings

    @fuzz_settings  # or @settings(fuzz_settings, max_examples=N)
    @given(...)
    def check(...): ...
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

__all__ = ["EXAMPLES", "fuzz_settings"]

#: Examples per test of the control channel and the host protocol: ``NBCLUSTER_FUZZ_EXAMPLES``
#: (default 10) times 5.
EXAMPLES = 5 * int(os.environ.get("NBCLUSTER_FUZZ_EXAMPLES", "10"))

#: Derandomized (the same examples every run), no example database, no deadline (a real
#: cluster answers), no shrinking, no health checks.
fuzz_settings = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)
