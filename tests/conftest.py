from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.netns import NamespaceUnavailable, migrate_sysctl, private_netns


@pytest.fixture(scope="session", autouse=True)
def host_sysctl_untouched() -> Iterator[None]:
    """No test may change the host namespace's tcp_migrate_req (they set it in private ones)."""
    before = migrate_sysctl()
    yield
    assert migrate_sysctl() == before, "a test changed net.ipv4.tcp_migrate_req in the host namespace"


@pytest.fixture
def netns() -> Iterator[None]:
    """Run the test in a fresh network namespace with only loopback up."""
    try:
        with private_netns():
            assert migrate_sysctl() == "0"
            yield
    except NamespaceUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must be able to create network namespaces: {exc}")
        pytest.skip(str(exc))
