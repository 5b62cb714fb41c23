"""Structured logs: one pipeline for structlog and stdlib (Celery), secrets masked, decisions logged."""

from __future__ import annotations

import json
import logging

import pytest
import structlog
from structlog.testing import capture_logs

from fleet.autoscaler.actuator import Actuator
from fleet.autoscaler.config import parse_config
from fleet.autoscaler.model import Launch, OfferRef, Plan, PoolDecision, Snapshot
from fleet.obs.logs import configure_logging, get_logger, mask_secrets
from fleet.providers.fake import FakeProvider


@pytest.fixture(autouse=True)
def _reset_logging():
    """Leave logging as it was for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("event", "field", "expected"),
    [
        ({"broker": "redis://:hunter2@10.0.0.1:6379/0"}, "broker", "redis://:***@10.0.0.1:6379/0"),
        (
            {"msg": "cannot reach amqp://fleet:s3cret@mq/vh now"},
            "msg",
            "cannot reach amqp://fleet:***@mq/vh now",
        ),
        ({"api_key": "sk-live-123"}, "api_key", "***"),
        ({"password": "x"}, "password", "***"),
        ({"idempotency_key": "order-7"}, "idempotency_key", "order-7"),
        ({"queue": "inference.nvidia-l4"}, "queue", "inference.nvidia-l4"),
    ],
)
def test_secrets_are_masked(event, field, expected):
    """URL passwords and secret-named fields never reach a log line."""
    assert mask_secrets(None, "info", dict(event))[field] == expected


def test_json_lines_from_structlog_and_celery_share_one_shape(capsys):
    """Structlog events and stdlib (Celery) records both come out as masked JSON lines."""
    configure_logging("INFO", fmt="json")
    get_logger("fleet.test").info(
        "task.submitted", queue="inference.nvidia-l4", broker="redis://:pw@h/0"
    )
    logging.getLogger("celery.worker").warning("connected to %s", "redis://:pw@h:6379/0")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    ours, celery = lines[-2], lines[-1]
    assert ours["event"] == "task.submitted"
    assert ours["queue"] == "inference.nvidia-l4"
    assert ours["broker"] == "redis://:***@h/0"
    assert celery["logger"] == "celery.worker"
    assert "pw" not in celery["event"]
    assert {"timestamp", "level"} <= set(ours) & set(celery)


def test_disabled_levels_are_dropped_before_rendering(capsys):
    """Below the configured level nothing is rendered."""
    configure_logging("WARNING", fmt="json")
    get_logger("fleet.test").info("quiet")
    assert "quiet" not in capsys.readouterr().err


def test_autoscaler_decisions_are_logged_with_reason_and_price():
    """Each launch is one event with pool, offer, $/h and the planner's reason."""
    config = parse_config(
        '[[pools]]\nname = "l4"\nprovider = "fake"\naccelerator = "nvidia-l4"\nprice_as = "aws/us-east-1/g6.xlarge"\n',
        env={},
    )
    offer = OfferRef("aws", "us-east-1", "g6.xlarge", "on_demand")
    launch = Launch("l4", offer, "tok-1", 0.8048, 1, "backlog 12 tasks on inference.nvidia-l4")
    plan = Plan(10.0, (PoolDecision("l4", 0, 1, (launch,), (), ("scale out",), 0.0, 0.8048),))
    actuator = Actuator(config, {"fake": FakeProvider()}, app=None)  # type: ignore[arg-type]
    with capture_logs() as logs:
        actuator.act(plan, Snapshot(10.0, {}, ()), 10.0)
    launched = [e for e in logs if e["event"] == "autoscaler.launched"]
    assert len(launched) == 1
    assert launched[0]["pool"] == "l4"
    assert launched[0]["usd_per_hour"] == pytest.approx(0.8048)
    assert "backlog" in launched[0]["reason"]
