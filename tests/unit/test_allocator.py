"""The allocator tuning is applied once per process, and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from siterecovery.allocator import tune_for_streaming as t; print(t(), t())"


def run(**env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", CODE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applied_with_glibc_and_off_on_request() -> None:
    assert run(SITERECOVERY_MALLOC_TUNING="1") == "True True"
    assert run(SITERECOVERY_MALLOC_TUNING="0") == "False False"
