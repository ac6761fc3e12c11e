"""Test configuration.

The CUDA target is tested on Numba's CPU simulator: ``NUMBA_ENABLE_CUDASIM=1`` must
be set before numba is first imported, which is why it happens here, at the top of
the first module pytest imports. Set ``PTOC_TEST_REAL_CUDA=1`` to run the CUDA tests
on a real GPU instead.

Hypothesis runs under a deterministic profile (``derandomize=True``) so CI is
reproducible; ``HYPOTHESIS_PROFILE=dev`` gives random exploration with more examples.
"""

import os

if os.environ.get("PTOC_TEST_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
