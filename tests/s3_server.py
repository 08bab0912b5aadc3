"""A real S3-compatible server on 127.0.0.1 for the bucket tests and the bucket benchmark.

moto's server mode (``python -m moto.server``) in a subprocess, with authentication on: the first
three requests (unauthenticated) create an IAM user, give it every S3 permission and make its
access key; from then on the server refuses any request not signed with that key, as a real store
does. Clients reach it the standard way, through the environment: ``env()`` gives the
``AWS_*`` variables (endpoint, key, region) that botocore, and so s3fs, read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pretrain_runs import free_port

_UNSIGNED_SETUP_REQUESTS = 3  # create_user, put_user_policy, create_access_key
_ALL_OF_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def unavailable_reason() -> str | None:
    """Why this machine cannot run the server (a package missing), or None."""
    for module in ("moto", "flask", "flask_cors", "boto3", "s3fs"):
        try:
            __import__(module)
        except ImportError as err:
            return f"the S3 test server needs {module} (pip install -e '.[test]'): {err}"
    return None




class S3Server:
    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNSIGNED_SETUP_REQUESTS)}
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self._wait_until_listening()
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="vlpretrain-tests")
        iam.put_user_policy(UserName="vlpretrain-tests", PolicyName="s3", PolicyDocument=json.dumps(_ALL_OF_S3))
        key = iam.create_access_key(UserName="vlpretrain-tests")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def _wait_until_listening(self, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not listen on {self.port} within {timeout_s:.0f} s")

    def env(self, secret: str | None = None) -> dict[str, str]:
        """The standard AWS client variables for this server (``secret`` to sign with a wrong key)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": secret if secret is not None else self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, directory: Path, url: str) -> None:
        """Every file of ``directory`` (not recursive) to ``s3://bucket/prefix``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        client = self.client()
        for path in sorted(directory.iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.name}".lstrip("/"))

    def objects(self, url: str) -> dict[str, bytes]:
        """Key (relative to the prefix) -> bytes of every object under ``s3://bucket/prefix``."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        client = self.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()
