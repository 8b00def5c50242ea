import os
from unittest import mock

import pytest


@pytest.fixture(scope="module")
def s3():
    """The suite's S3 server (moto, a subprocess on 127.0.0.1, credentials checked), one per test module."""
    from support.s3_server import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture
def aws(s3):
    """The server's credentials and endpoint as this process's AWS environment, none of the caller's."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "S3_ENDPOINT_URL"}
    with mock.patch.dict(os.environ, {**own, **s3.env()}, clear=True):
        yield s3
