"""The function's names the tests use, each from the module of the package where it lives (lambda/orchestrator/),
under the one name `bo` the tests have always used: `from tests import function as bo`. The handler file itself is
`handler`: importing it runs the function's INIT, as Lambda does."""

from __future__ import annotations

import importlib
import pkgutil

import backend_orchestrator as handler
import orchestrator
from orchestrator.activity import (
    IDLE_SECONDS_FIELDS,
    IN_FLIGHT_FIELDS,
    LAST_ACTIVITY_FIELDS,
    Activity,
    ActivityUnknown,
    parse_activity,
)
from orchestrator.aws import IAM_ACTIONS, aws_client, instance_metrics, warm_clients
from orchestrator.backend import MAX_ACTIVITY_BYTES, NotDrainedError, drain, fetch_activity, probe_health
from orchestrator.budget import (
    ANSWER_MARGIN_SECONDS,
    AWS_CONNECT_TIMEOUT_SECONDS,
    AWS_MAX_ATTEMPTS,
    AWS_MIN_ATTEMPT_SECONDS,
    AWS_READ_TIMEOUT_SECONDS,
    MIN_BACKEND_SECONDS,
    NOTHING_AFTER,
    STOPPING_POLL_SECONDS,
    Clock,
    Deadline,
    answer_margin,
    aws_call_seconds,
    longest_path,
    shortest_check_seconds,
    shortest_timeout,
    stop_seconds,
    whole_attempts_timeout,
)
from orchestrator.entry import handle
from orchestrator.errors import (
    CAPACITY_RETRY_AFTER_SECONDS,
    ERRORS,
    RECOMMENDED_TIMEOUT_SECONDS,
    RETRY_AFTER_SECONDS,
    AwsError,
    BadRequestError,
    ConfigError,
    OrchestratorError,
)
from orchestrator.holds import Hold
from orchestrator.logs import LOG, METRICS, METRICS_LOG, JsonFormatter
from orchestrator.preflight import GROUP_CHECKS, PREFLIGHT_CHECKS
from orchestrator.present import sns_subject
from orchestrator.rules import MetricSamples, decide, judge, judge_metrics, metric_window
from orchestrator.settings import INSTANCE_ID_PATTERN, MIN_TOKEN_CHARS, VARIABLES, AuthToken, Config, Settings
from orchestrator.targets import InstanceInfo
from orchestrator.windows import DAYS, Window
from orchestrator.words import BUSY_SINCE_TAG, HOLD_TAG, HOLD_TAGS, Action, Decision

lambda_handler = handler.lambda_handler
# Every module of the package, for the tests that read the function's source or look a name up in it.
FUNCTION_MODULES = tuple(
    importlib.import_module(f"orchestrator.{info.name}") for info in pkgutil.iter_modules(orchestrator.__path__)
)
