"""INIT builds the AWS clients: Lambda runs the import on a full vCPU and an invocation on memory / 1,769 MB of
one, so no invocation of a well configured function builds a client. Counted, not timed (make bench times it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REGION, refused_port, setup_client, stopped_instance

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent

# Imports the function as the runtime does, with every client botocore builds counted, then invokes it.
COUNT_CLIENTS = """
import json, sys
import botocore.session

built = []
create_client = botocore.session.Session.create_client

def counting(self, service_name, *args, **kwargs):
    built.append(service_name)
    return create_client(self, service_name, *args, **kwargs)

botocore.session.Session.create_client = counting
import backend_orchestrator

at_init = list(built)

class Context:
    aws_request_id = "req-init"

    def get_remaining_time_in_millis(self):
        return 60_000

answers = [backend_orchestrator.lambda_handler(json.loads(event), Context()) for event in sys.argv[1:]]
print(json.dumps({"init": at_init, "invocations": built[len(at_init):], "answers": answers}, default=str))
"""


def run_container(environ: dict[str, str], *events: dict[str, Any]) -> dict[str, Any]:
    """A fresh interpreter: INIT, then each event in turn, as one Lambda container would."""
    done = subprocess.run(
        [sys.executable, "-c", COUNT_CLIENTS, *(json.dumps(event) for event in events)],
        env={**os.environ, "PYTHONPATH": str(ROOT / "lambda"), **environ},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_no_invocation_builds_a_client_when_the_configuration_is_valid(moto_url: str) -> None:
    instance_id = stopped_instance(moto_url)
    topic_arn = setup_client("sns", moto_url).create_topic(Name="backend-orchestrator")["TopicArn"]
    environ = {
        "INSTANCE_ID": instance_id,
        "AWS_REGION": REGION,
        "BACKEND_BASE_URL": f"http://127.0.0.1:{refused_port()}",  # down: check_idle asks CloudWatch
        "IDLE_TIMEOUT_SECONDS": "1",
        "NOTIFY_TOPIC_ARN": topic_arn,
    }
    events = [{"action": "start"}, {"action": "status"}, {"action": "check_idle"}, {"action": "stop"}]
    result = run_container(environ, *events)
    assert sorted(result["init"]) == ["cloudwatch", "ec2", "sns"]
    assert result["invocations"] == []
    assert [answer["ok"] for answer in result["answers"]] == [True, True, True, True]


def test_init_builds_only_the_clients_the_configuration_uses(moto_url: str) -> None:
    environ = {"INSTANCE_ID": stopped_instance(moto_url), "AWS_REGION": REGION, "IDLE_CPU_PERCENT": "0"}
    result = run_container(environ, {"action": "start"})
    assert (result["init"], result["invocations"]) == (["ec2"], [])


def test_a_configuration_error_at_init_is_answered_by_the_invocation(moto_url: str) -> None:
    result = run_container({"INSTANCE_ID": "i-123", "AWS_REGION": REGION}, {"action": "start"})
    assert result["init"] == []
    [answer] = result["answers"]
    assert answer["error"]["code"] == "config_error"
    assert "INSTANCE_ID" in answer["error"]["message"]
