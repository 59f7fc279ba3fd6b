"""Fixtures shared by the tests of the native epilogues (test_native.py, test_native_build.py)."""
import pytest

from are_fast.ops import native


@pytest.fixture(scope="module")
def ops():
    """The native epilogues (are_fast.ops.native.epilogues()), built on first use. A library that cannot be built
    fails the tests that take this fixture: CI must build it."""
    if not native.library.load(build=True):
        pytest.fail(f"the native library is unavailable: {native.library.reason}")
    return native.epilogues()
