"""Every AWS call the function makes, within the invocation's deadline: one client per service and region, built
during INIT, with the attempts that fit; errors told apart by AWS's code, never its text. CloudWatch's metrics and
SNS's notices are here; EC2's calls are the fleet's (fleet.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cache
from typing import Any, Final, NamedTuple, TypeVar

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from orchestrator.budget import (
    AWS_CONNECT_TIMEOUT_SECONDS,
    AWS_MAX_ATTEMPTS,
    AWS_MIN_ATTEMPT_SECONDS,
    AWS_READ_TIMEOUT_SECONDS,
    Deadline,
    aws_call_seconds,
    within,
)
from orchestrator.errors import AccessDeniedError, AwsError, AwsUnreachableError, ConfigError, OutOfTimeError
from orchestrator.rules import METRIC_PERIOD_SECONDS, MetricSamples
from orchestrator.settings import Config

T = TypeVar("T")
# The IAM action of each call (service:Operation, as aws_call names it when AWS refuses one); an Auto Scaling group's
# hold is written with autoscaling:CreateOrUpdateTags and autoscaling:DeleteTags.
IAM_ACTIONS: Final = {
    "DescribeInstances": "ec2:DescribeInstances",
    "StartInstances": "ec2:StartInstances",
    "StopInstances": "ec2:StopInstances",
    "GetMetricData": "cloudwatch:GetMetricData",
    "Publish": "sns:Publish",
    "CreateTags": "ec2:CreateTags",
    "DeleteTags": "ec2:DeleteTags",
    "DescribeAutoScalingGroups": "autoscaling:DescribeAutoScalingGroups",
    "DescribePolicies": "autoscaling:DescribePolicies",
    "SetDesiredCapacity": "autoscaling:SetDesiredCapacity",
    "SetInstanceProtection": "autoscaling:SetInstanceProtection",
    "CreateOrUpdateTags": "autoscaling:CreateOrUpdateTags",
}
SERVICE_NAMES: Final = {"ec2": "EC2", "cloudwatch": "CloudWatch", "sns": "SNS", "autoscaling": "Auto Scaling"}
METRIC_QUERIES_PER_CALL: Final = 500  # GetMetricData's limit
# "403": what botocore names an error answered HTTP 403 with no code of its own (moto's CloudWatch does that).
ACCESS_DENIED_CODES: Final = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "403"})


@cache
def aws_client(service: str, region: str | None) -> Any:
    """One client per container, service and region, built during INIT (see warm_clients); each call's attempts
    are cut to what fits its time by _no_attempt_past_the_grant."""
    config = BotoConfig(
        retries={"mode": "standard", "total_max_attempts": AWS_MAX_ATTEMPTS},
        connect_timeout=AWS_CONNECT_TIMEOUT_SECONDS,
        read_timeout=AWS_READ_TIMEOUT_SECONDS,
    )
    client = boto3.client(service, region_name=region, config=config)  # type: ignore[call-overload]
    retries = f"needs-retry.{client.meta.service_model.service_id.hyphenize()}"
    client.meta.events.register_first(retries, _no_attempt_past_the_grant)  # asked before botocore's own handler
    return client


_GRANT = threading.local()  # on the thread of one AWS call (see within): `attempts`, how many it may make


def _no_attempt_past_the_grant(
    attempts: int, response: Any, caught_exception: BaseException | None, operation: Any, **_: Any
) -> None:
    """botocore's needs-retry event: refuse a retry beyond the attempts this call was granted, by ending the call
    with what it would end with after its last retry. (Answering False refuses in botocore 1.44, but 1.38 and older,
    which Lambda runtimes ship, retry at once on it; an exception ends the call in every version.)"""
    if attempts < getattr(_GRANT, "attempts", AWS_MAX_ATTEMPTS):
        return  # botocore's standard handler decides
    if caught_exception is not None:
        raise caught_exception
    http_response, parsed = response
    if http_response.status_code >= 300:
        raise ClientError(parsed, operation.name)


def warm_clients(environ: Mapping[str, str]) -> None:
    """INIT: build the clients the configuration will use. Lambda runs the import on a full vCPU but an invocation
    on memory / 1,769 MB of one, where the ~200 ms of CPU a first client costs takes seconds. A configuration
    error is left for the invocation to answer (config_error), and so is a client that cannot be built."""
    try:
        config = Config.from_env(environ)
        aws_client("ec2", config.region)
        if config.auto_scaling_group_name:
            aws_client("autoscaling", config.region)
        if config.idle_cpu_percent > 0:
            aws_client("cloudwatch", config.region)
        if config.notify_topic_arn:
            aws_client("sns", config.notify_topic_arn.split(":")[3])  # the topic's own region
    except (ConfigError, BotoCoreError):
        return


def aws_call(
    service: str, operation: str, region: str | None, deadline: Deadline, about: str, *, call: Callable[[Any], T]
) -> T:
    """One API call, `call(client)`, with as many attempts as fit before the deadline; errors told apart by code."""
    name = SERVICE_NAMES[service]
    try:
        client = aws_client(service, region)  # built at INIT; were it not, its build is counted before the grant
        left = deadline.left()
        attempts = next((n for n in range(AWS_MAX_ATTEMPTS, 0, -1) if aws_call_seconds(n) <= left), 0)
        if attempts == 0 and left < AWS_MIN_ATTEMPT_SECONDS:
            raise OutOfTimeError(f"{name} {operation}", left, AWS_MIN_ATTEMPT_SECONDS)

        def attempt() -> T:
            _GRANT.attempts = max(attempts, 1)
            return call(client)

        # Too little time for a whole attempt (a short timeout): one attempt of what is left, no retry.
        return within(aws_call_seconds(attempts) if attempts else left, attempt, f"{name} {operation}")
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code"))
        if code in ACCESS_DENIED_CODES:
            iam_action = f"{service}:{operation}"
            raise AccessDeniedError(
                f"{name} {operation} was denied ({code}): allow {iam_action} to the Lambda's role on {about}.",
                aws_error_code=code,
                iam_action=iam_action,
            ) from error
        raise AwsError(
            f"{name} {operation} on {about} failed with {code}. See docs/deploy.md's troubleshooting table; "
            "throttling and server errors were already retried.",
            aws_error_code=code,
        ) from error
    except (BotoCoreError, TimeoutError) as error:
        raise AwsUnreachableError(
            f"{name} {operation} failed before AWS answered ({type(error).__name__}). "
            f"Check the Lambda's network path to the {name} API (VPC endpoint or NAT) and retry."
        ) from error


def instance_metrics(
    region: str | None, instance_ids: Sequence[str], since: datetime, until: datetime, deadline: Deadline
) -> dict[str, MetricSamples]:
    """Each instance's CPU and network from AWS/EC2, period 300 s (basic and detailed monitoring alike), in one
    GetMetricData call for up to 166 instances (500 queries). https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/
    viewing_metrics_with_cloudwatch.html"""
    kinds = {"cpu": ("CPUUtilization", "Maximum"), "in": ("NetworkIn", "Sum"), "out": ("NetworkOut", "Sum")}
    samples: dict[str, MetricSamples] = {}
    per_call = METRIC_QUERIES_PER_CALL // len(kinds)
    for first in range(0, len(instance_ids), per_call):
        ids = instance_ids[first : first + per_call]
        wanted = {f"{kind}_{n}": ({"InstanceId": instance_id}, *metric) for n, instance_id in enumerate(ids)
                  for kind, metric in kinds.items()}  # fmt: skip
        about = f"instance {', '.join(ids)}"
        period = METRIC_PERIOD_SECONDS
        points = metric_data(region, "AWS/EC2", wanted, period=period, since=since, until=until, deadline=deadline,
                             about=about)  # fmt: skip
        for n, instance_id in enumerate(ids):
            samples[instance_id] = MetricSamples(*(points[f"{kind}_{n}"] for kind in kinds))
    return samples


def metric_data(
    region: str | None,
    namespace: str,
    wanted: Mapping[str, tuple[Mapping[str, str], str, str]],
    *,
    period: int,
    since: datetime,
    until: datetime,
    deadline: Deadline,
    about: str,
) -> dict[str, list[tuple[datetime, float]]]:
    """One GetMetricData call: {query ID: [(timestamp, value)]}, `wanted` as {ID: (dimensions, name, statistic)}."""
    queries: list[Any] = [
        {"Id": key, "MetricStat": {"Metric": {"Namespace": namespace, "MetricName": name, "Dimensions": [
            {"Name": dimension, "Value": value} for dimension, value in dimensions.items()]},
            "Period": period, "Stat": stat}}
        for key, (dimensions, name, stat) in wanted.items()
    ]  # fmt: skip
    about = f'the {namespace} metrics of {about} (GetMetricData needs Resource "*")'

    def call(client: Any) -> Any:
        return client.get_metric_data(MetricDataQueries=queries, StartTime=since, EndTime=until)

    results = aws_call("cloudwatch", "GetMetricData", region, deadline, about, call=call)["MetricDataResults"]
    points = {result["Id"]: list(zip(result["Timestamps"], result["Values"], strict=True)) for result in results}
    return {key: points.get(key, []) for key in wanted}


class Notice(NamedTuple):
    subject: str
    message: str
    attributes: dict[str, str]


def publish(topic_arn: str, notice: Notice, deadline: Deadline) -> None:
    """Publish one notice to the topic (in the topic's own region)."""
    attributes = {name: {"DataType": "String", "StringValue": value} for name, value in notice.attributes.items()}

    def call(client: Any) -> Any:
        return client.publish(
            TopicArn=topic_arn, Subject=notice.subject, Message=notice.message, MessageAttributes=attributes
        )

    aws_call("sns", "Publish", topic_arn.split(":")[3], deadline, f"topic {topic_arn}", call=call)
