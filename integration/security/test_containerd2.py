"""The operator's profile choice under containerd 2.x
(tools/gotools.py builds it), as under Debian's 1.6.

containerd 2.3 and later hand `start` the runtime options (and the shim config path in
them) inside a BootstrapParams message, which the shim long read as bare options. The
profile policy is not decided there but at Create, from the task options containerd
sends in the same form as 1.6 did: these tests pass with and without the BootstrapParams
fix and guard that the operator's config keeps governing the profile under 2.x. The
operator-config test of test_profile_selection.py runs again here. Skipped with the reason
when 2.x is not built.
"""

import pytest

# The test itself, collected and run again here against containerd 2.x (the layers check
# of test_containerd.py runs under 2.x there: integration/conftest.py parametrizes it).
from integration.security.test_profile_selection import (  # noqa: F401
    test_operator_config_wins_over_an_annotation_it_does_not_allow,
)

pytestmark = pytest.mark.containerd


@pytest.fixture(scope="module")
def containerd(containerd2):
    # busybox_image follows: integration/conftest.py imports it into the version given
    return containerd2
