"""AWS EC2 provider: the contract of ``fleet.providers.base`` on RunInstances and tags.

The only module of ``fleet`` that imports boto3/botocore (the ``fleet[aws]`` extra);
``fleet.pricing.aws`` gets its clients and error handling from here. What it promises
beyond the base contract:

* **Idempotent by token, by two means.** Every launch first looks for an instance
  tagged ``fleet-token=<token>`` (states pending, running, stopping, stopped) and
  returns it; only if there is none does it call RunInstances, which also carries the
  token as EC2's ``ClientToken`` (tokens over 64 characters, EC2's limit, are sent as
  their SHA-256). On real EC2 the ClientToken covers the window where a just-launched
  instance is not yet visible to DescribeInstances; the tag check covers what the
  ClientToken does not: moto ignores ``ClientToken`` altogether (a retried launch there
  would start a second instance), and EC2 forgets tokens after a while. A timed-out
  RunInstances retried with the same token therefore leaves one instance.
* **Tagged at creation.** TagSpecifications put the fleet tags (``request.tags()``) plus
  ``Name``, ``fleet-usd-per-hour`` and ``fleet-devices`` on the instance atomically with
  its creation, so a crashed autoscaler's instances are found again by ``list``: it
  filters on ``tag:fleet=<fleet_name>`` and never keeps state of its own. A request
  whose ``fleet_name`` differs from the provider's is refused (it would launch an
  instance this provider cannot list: a leak).
* **Markets.** ``offer.market == "spot"`` launches a one-time spot instance that is
  terminated on interruption; listed instances are spot when EC2 reports
  ``InstanceLifecycle == "spot"``.
* **States.** pending -> PENDING, running -> RUNNING; shutting-down, stopping, stopped
  (and terminated, seen only in a RunInstances answer) -> TERMINATING. Terminated
  instances are not listed.
* **Errors are data.** botocore's standard retry mode (5 attempts) retries throttling
  and transient errors first; what remains becomes a ``ProviderError`` whose kind comes
  from the EC2 error code (``error_kind``) and whose message is the code and the
  service's message only (access-key ids redacted), never credentials or request data.
  Connection and other SDK errors are ``OTHER`` (missing credentials ``AUTH``).
* **Terminate is idempotent**: an unknown id (``InvalidInstanceID.NotFound`` or
  ``.Malformed``) is already gone.

Credentials come from boto3's standard chain (environment, profile, instance role);
nothing here reads, logs or stores them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

import boto3  # type: ignore[import-untyped]  # boto3 ships no type hints; clients are Any here
import botocore.config  # type: ignore[import-untyped]  # same
from botocore.exceptions import (  # type: ignore[import-untyped]  # same
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from fleet.autoscaler.model import ErrorKind, Instance, InstanceState, OfferRef, ProviderError
from fleet.providers.base import FLEET_TAG, POOL_TAG, TOKEN_TAG, LaunchRequest, LaunchResult

USD_TAG = "fleet-usd-per-hour"
DEVICES_TAG = "fleet-devices"
CLIENT_TOKEN_MAX = 64  # EC2's limit on ClientToken
RETRY_CONFIG: dict[str, Any] = {"mode": "standard", "max_attempts": 5}
#: Exceptions an AWS call may raise that ``describe_error`` turns into data.
AWS_ERRORS: tuple[type[Exception], ...] = (ClientError, BotoCoreError)

_TOKEN_STATES = ["pending", "running", "stopping", "stopped"]
_LIST_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
_STATES = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "shutting-down": InstanceState.TERMINATING,
    "stopping": InstanceState.TERMINATING,
    "stopped": InstanceState.TERMINATING,
    "terminated": InstanceState.TERMINATING,
}
_KINDS = {
    "InsufficientInstanceCapacity": ErrorKind.CAPACITY,
    "InsufficientHostCapacity": ErrorKind.CAPACITY,
    "InsufficientCapacity": ErrorKind.CAPACITY,
    "SpotMaxPriceTooLow": ErrorKind.CAPACITY,
    "MaxSpotInstanceCountExceeded": ErrorKind.QUOTA,
    "VcpuLimitExceeded": ErrorKind.QUOTA,
    "InstanceLimitExceeded": ErrorKind.QUOTA,
    "RequestLimitExceeded": ErrorKind.THROTTLED,
    "Throttling": ErrorKind.THROTTLED,
    "ThrottlingException": ErrorKind.THROTTLED,
    "Unsupported": ErrorKind.UNSUPPORTED,
    "InvalidInstanceType": ErrorKind.UNSUPPORTED,
    "AuthFailure": ErrorKind.AUTH,
    "UnauthorizedOperation": ErrorKind.AUTH,
    "InvalidClientTokenId": ErrorKind.AUTH,
    "SignatureDoesNotMatch": ErrorKind.AUTH,
    "ExpiredToken": ErrorKind.AUTH,
    "AccessDeniedException": ErrorKind.AUTH,
}
_GONE = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
_ACCESS_KEY = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_MESSAGE_MAX = 300


def make_client(
    service: str, region: str, *, endpoint_url: str | None = None, max_attempts: int = 5
) -> Any:  # noqa: ANN401 - boto3 clients are untyped
    """A boto3 client for ``service`` with the standard retry mode and the default credentials."""
    retries = {**RETRY_CONFIG, "max_attempts": max_attempts}
    return boto3.client(
        service,
        region_name=region,
        endpoint_url=endpoint_url,
        config=botocore.config.Config(retries=retries),
    )


def error_kind(code: str, message: str = "") -> ErrorKind:
    """The taxonomy kind of an AWS error code (``InvalidParameterValue`` naming an instance type is UNSUPPORTED)."""
    kind = _KINDS.get(code) or _KINDS.get(code.split(".", 1)[0])
    if kind is not None:
        return kind
    if code == "InvalidParameterValue" and "instance type" in message.lower():
        return ErrorKind.UNSUPPORTED
    return ErrorKind.OTHER


def describe_error(exc: Exception) -> tuple[ErrorKind, str]:
    """The kind and a credential-free message of an exception from ``AWS_ERRORS``.

    A ClientError is described by the response's error code and message only (access-key
    ids redacted, at most 300 characters); an SDK error by its class (and endpoint).
    """
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        text = _ACCESS_KEY.sub("[redacted]", str(error.get("Message", "")))[:_MESSAGE_MAX]
        return error_kind(code, text), f"{code}: {text}" if text else code
    if isinstance(exc, NoCredentialsError):
        return ErrorKind.AUTH, "NoCredentialsError: no AWS credentials found"
    if isinstance(exc, EndpointConnectionError):
        endpoint = exc.kwargs.get("endpoint_url", "")
        return ErrorKind.OTHER, f"EndpointConnectionError: cannot reach {endpoint}"
    return ErrorKind.OTHER, type(exc).__name__


def client_token(token: str) -> str:
    """EC2's ``ClientToken`` for ``token``: itself, or its SHA-256 when over 64 characters."""
    if len(token) <= CLIENT_TOKEN_MAX and token.isascii() and token.isprintable():
        return token
    return hashlib.sha256(token.encode()).hexdigest()


class AwsProvider:
    """Buys EC2 instances in one region (see the module contract)."""

    name = "aws"

    def __init__(
        self,
        region: str,
        *,
        fleet_name: str = "fleet",
        image_id: str,
        subnet_id: str | None = None,
        security_group_ids: tuple[str, ...] = (),
        instance_profile: str | None = None,
        user_data: str = "",
        endpoint_url: str | None = None,
        client: Any = None,  # noqa: ANN401 - an injected boto3 EC2 client (untyped)
    ) -> None:
        """Build a provider for ``region``.

        Args:
            region: the EC2 region; offers of other regions are UNSUPPORTED.
            fleet_name: the ``fleet`` tag value this provider launches and lists.
            image_id: the AMI every instance boots.
            subnet_id: the subnet to launch in (the default VPC's when None).
            security_group_ids: security groups for the instances.
            instance_profile: an IAM instance profile name (how the instance reads its
                secrets; none are passed in user data).
            user_data: the instance's user data (plain text; boto3 base64-encodes it).
            endpoint_url: another EC2 endpoint (moto, a VPC endpoint).
            client: a ready boto3 EC2 client (tests); built from the above when None.

        """
        self.region = region
        self.fleet_name = fleet_name
        self.image_id = image_id
        self.subnet_id = subnet_id
        self.security_group_ids = tuple(security_group_ids)
        self.instance_profile = instance_profile
        self.user_data = user_data
        self._ec2: Any = (
            client if client is not None else make_client("ec2", region, endpoint_url=endpoint_url)
        )

    # -- the Provider contract -------------------------------------------------------

    def launch(self, request: LaunchRequest, now: float) -> LaunchResult:
        """Start one instance of ``request.offer``, idempotently by ``request.token``.

        Returns:
            The instance this token already launched (as EC2 reports it), the new one
            (``launched_at=now``, the request's price and devices), or an error.

        """
        offer = request.offer
        if offer.cloud != "aws" or offer.region != self.region:
            return LaunchResult(
                error=self._error(
                    request.pool,
                    offer,
                    ErrorKind.UNSUPPORTED,
                    f"offer {offer.key} is not in aws/{self.region}",
                    now,
                )
            )
        if request.fleet_name != self.fleet_name:
            return LaunchResult(
                error=self._error(
                    request.pool,
                    offer,
                    ErrorKind.OTHER,
                    f"request for fleet {request.fleet_name!r} sent to the provider of fleet {self.fleet_name!r}",
                    now,
                )
            )
        try:
            found = self._by_token(request.token)
            if found is not None:
                return LaunchResult(instance=found)
            answer = self._ec2.run_instances(**self._run_args(request))
        except AWS_ERRORS as exc:
            kind, message = describe_error(exc)
            return LaunchResult(error=self._error(request.pool, offer, kind, message, now))
        raw = answer["Instances"][0]
        instance = self._instance(raw)
        return LaunchResult(
            instance=Instance(
                id=instance.id,
                pool=request.pool,
                offer=instance.offer,
                state=instance.state,
                launched_at=now,
                token=request.token,
                usd_per_hour=request.usd_per_hour,
                devices=request.devices,
            )
        )

    def terminate(self, instance_id: str, now: float) -> ProviderError | None:
        """TerminateInstances; None on success or when the id is unknown (already gone)."""
        try:
            self._ec2.terminate_instances(InstanceIds=[instance_id])
        except AWS_ERRORS as exc:
            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _GONE:
                return None
            kind, message = describe_error(exc)
            return self._error("", None, kind, f"terminate {instance_id}: {message}", now)
        return None

    def list_instances(self, now: float) -> list[Instance] | ProviderError:
        """Every non-terminated instance tagged ``fleet=<fleet_name>`` in the region."""
        try:
            return [
                self._instance(raw)
                for raw in self._describe(
                    [
                        {"Name": f"tag:{FLEET_TAG}", "Values": [self.fleet_name]},
                        {"Name": "instance-state-name", "Values": _LIST_STATES},
                    ]
                )
            ]
        except AWS_ERRORS as exc:
            kind, message = describe_error(exc)
            return self._error("", None, kind, f"list: {message}", now)

    # -- internals -------------------------------------------------------------------

    def _run_args(self, request: LaunchRequest) -> dict[str, Any]:
        tags = {
            **request.tags(),
            "Name": f"{request.fleet_name}-{request.pool}",
            USD_TAG: repr(float(request.usd_per_hour)),
            DEVICES_TAG: str(request.devices),
        }
        args: dict[str, Any] = {
            "ImageId": self.image_id,
            "InstanceType": request.offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(request.token),
            "TagSpecifications": [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
                }
            ],
        }
        if request.offer.market == "spot":
            args["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        if self.user_data:
            args["UserData"] = self.user_data
        if self.subnet_id:
            args["SubnetId"] = self.subnet_id
        if self.security_group_ids:
            args["SecurityGroupIds"] = list(self.security_group_ids)
        if self.instance_profile:
            args["IamInstanceProfile"] = {"Name": self.instance_profile}
        return args

    def _by_token(self, token: str) -> Instance | None:
        """The live instance tagged with ``token`` (the oldest if, against hope, several)."""
        answer = self._ec2.describe_instances(
            Filters=[
                {"Name": f"tag:{TOKEN_TAG}", "Values": [token]},
                {"Name": "instance-state-name", "Values": _TOKEN_STATES},
            ]
        )
        found = [
            self._instance(raw)
            for reservation in answer.get("Reservations", [])
            for raw in reservation.get("Instances", [])
        ]
        return min(found, key=lambda i: (i.launched_at, i.id)) if found else None

    def _describe(self, filters: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        pages = self._ec2.get_paginator("describe_instances").paginate(Filters=filters)
        return [
            raw
            for page in pages
            for reservation in page.get("Reservations", [])
            for raw in reservation.get("Instances", [])
        ]

    def _instance(self, raw: dict[str, Any]) -> Instance:
        tags = {t["Key"]: t["Value"] for t in raw.get("Tags", [])}
        launch_time = raw.get("LaunchTime")
        try:
            usd = float(tags.get(USD_TAG, "0"))
        except ValueError:
            usd = 0.0
        devices_tag = tags.get(DEVICES_TAG, "1")
        return Instance(
            id=raw["InstanceId"],
            pool=tags.get(POOL_TAG, ""),
            offer=OfferRef(
                cloud="aws",
                region=self.region,
                instance_type=raw.get("InstanceType", ""),
                market="spot" if raw.get("InstanceLifecycle") == "spot" else "on_demand",
            ),
            state=_STATES.get(raw.get("State", {}).get("Name", ""), InstanceState.PENDING),
            launched_at=launch_time.timestamp() if launch_time is not None else 0.0,
            token=tags.get(TOKEN_TAG, ""),
            usd_per_hour=usd,
            devices=int(devices_tag) if devices_tag.isdigit() else 1,
        )

    @staticmethod
    def _error(
        pool: str, offer: OfferRef | None, kind: ErrorKind, message: str, now: float
    ) -> ProviderError:
        return ProviderError(pool=pool, offer=offer, kind=kind, message=f"aws: {message}", at=now)
