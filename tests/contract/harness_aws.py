"""The AWS provider's contract harness: ``AwsProvider`` against a real moto server process.

``aws_harness`` starts ``python -m moto.server`` on a free loopback port (instance-type
validation on, so an unknown type is rejected as EC2 does), builds boto3 clients with
the fake ``testing`` credentials passed explicitly (the process environment is left
alone), and always stops the server. moto ignores ``ClientToken``; the provider's own
tag check is what keeps a retried launch to one instance, and the suite checks it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints

from fleet.autoscaler.model import ErrorKind, OfferRef
from fleet.providers.aws import DEVICES_TAG, USD_TAG, AwsProvider
from fleet.providers.base import LaunchRequest
from tests.contract.conftest import Harness, make_request

REGION = "us-east-1"
AWS_OFFER = OfferRef("aws", REGION, "c6i.xlarge", "on_demand")
# Tags the AWS provider adds beyond the contract's fleet tags (left out by ``tags_of``).
EXTRA_TAGS = frozenset({"Name", USD_TAG, DEVICES_TAG})
START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    """A moto server process on a free loopback port; its endpoint URL. Always stopped."""
    port = _free_port()
    env = {
        **os.environ,
        "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({proc.returncode}); see {log_path}")
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):  # noqa: S310 - our http URL
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(service: str, url: str, region: str = REGION) -> Any:
    """A boto3 client for the moto server at ``url`` with the fake credentials."""
    return boto3.client(
        service,
        region_name=region,
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106 - moto's fake credentials
    )


def any_image(url: str) -> str:
    """An AMI id from moto's default images."""
    images = client("ec2", url).describe_images(Owners=["amazon"])["Images"]
    return str(images[0]["ImageId"])


def make_provider(url: str, image_id: str, **kwargs: Any) -> AwsProvider:
    """An ``AwsProvider`` over the moto server at ``url`` (a fresh client each time)."""
    return AwsProvider(REGION, image_id=image_id, client=client("ec2", url), **kwargs)


def instance_tags(url: str, instance_id: str) -> dict[str, str]:
    """Every tag of an instance, as EC2 reports it."""
    answer = client("ec2", url).describe_tags(
        Filters=[{"Name": "resource-id", "Values": [instance_id]}]
    )
    return {t["Key"]: t["Value"] for t in answer["Tags"]}


@contextmanager
def aws_harness(tmp_path: Path) -> Iterator[Harness]:
    """A ``Harness`` for ``AwsProvider`` over a private moto server (stopped on exit)."""
    with moto_server(tmp_path / "moto.log") as url:
        image_id = any_image(url)

        def tags_of(instance_id: str) -> dict[str, str]:
            tags = instance_tags(url, instance_id)
            return {k: v for k, v in tags.items() if k not in EXTRA_TAGS}

        def failing() -> LaunchRequest:
            bad = OfferRef("aws", REGION, "zz9.nonexistent", "on_demand")
            return dataclasses.replace(make_request(), offer=bad)

        harness = Harness(
            kind="aws",
            provider=make_provider(url, image_id),
            reopen=lambda: make_provider(url, image_id),
            tags_of=tags_of,
            failing_request=failing,
            expected_error_kind=ErrorKind.UNSUPPORTED,  # moto: InvalidInstanceType.NotFound
            patience_s=5.0,
            offer=AWS_OFFER,
            env={"AWS_ENDPOINT_URL": url, "AWS_IMAGE_ID": image_id},
        )
        yield harness
