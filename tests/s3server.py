"""An S3-protocol server on loopback for the tests: moto's standalone server, reached over HTTP
exactly as AWS would be."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.pgcluster import free_port

BIN = Path(sys.executable).parent
# any credentials do for moto's server until it is asked to check them (Server.locked_down)
ACCESS_KEY, SECRET_KEY = "AKIAMIGRATEJOBTEST01", "test-secret-key-never-printed-0123456789"


class Server:
    """One moto server process on a free loopback port."""

    def __init__(self, no_auth_actions: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        if no_auth_actions is not None:  # after this many requests, moto checks IAM credentials and policies
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(no_auth_actions)
        self.process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("moto's server did not start")
            time.sleep(0.05)

    def client(self, service: str = "s3", key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret)

    def env(self, url: str | None = None) -> dict[str, str]:
        """What a job needs to reach this server as it would reach AWS."""
        return {"AWS_ENDPOINT_URL": url or self.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def read_only_user(self, bucket: str) -> tuple[str, str]:
        """An IAM user that may list and read `bucket`, nothing else (a server started with no_auth_actions=4,
        whose free requests this and the bucket's creation use)."""
        iam = self.client("iam")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"],
                           "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
        return key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
