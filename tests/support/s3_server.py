"""A real S3-compatible server for the tests: moto in server mode, a subprocess on 127.0.0.1.

A subprocess (not moto's in-process mocks): the code under test, its DataLoader workers, Ray and the CLIs
run in other processes and reach it over HTTP like a cluster reaches its store. Authentication is on: an
IAM user with an s3:* policy is made while the server still accepts anything, then the server is told to
check every request, so wrong credentials are refused as a real store refuses them.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator

from support.free_port import free_port

BUCKET = "tokens"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    url: str
    key_id: str
    secret: str

    def env(self, secret: str = "") -> Dict[str, str]:
        """The standard AWS variables a user sets (``secret``: another, wrong secret)."""
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": secret or self.secret,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL_S3": self.url}


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/moto-api/data.json", timeout=2).read()
            return
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("moto server did not start")
            time.sleep(0.1)


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(proc, url)
        boot = dict(endpoint_url=url, aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
                    region_name=REGION)
        iam = boto3.session.Session().client("iam", **boot)
        iam.create_user(UserName="tests")
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        iam.put_user_policy(UserName="tests", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.session.Session().client("s3", **boot).create_bucket(Bucket=BUCKET)
        req = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(req, timeout=10).read()  # from now on every request is authenticated
        yield S3Server(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
