"""One compact JSON log line and one CloudWatch Embedded Metric Format line per invocation, on stdout (the runtime
ships it to CloudWatch Logs): fixed keys, context as fields, never a secret.
https://docs.aws.amazon.com/AmazonCloudWatch/latest/monitoring/CloudWatch_Embedded_Metric_Format_Specification.html"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from orchestrator.words import Action


class JsonFormatter(logging.Formatter):
    """One compact JSON object per line: level, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"level": record.levelname, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stdout as it is at each record (the runtime ships stdout to CloudWatch)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _stdout_logger(name: str, formatter: logging.Formatter) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:  # a warm start imports nothing again, but be safe on reloads
        handler = StdoutHandler()
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.propagate = False  # the runtime's root handler would wrap our JSON in its own format
    return logger


LOG: Final = _stdout_logger("backend_orchestrator", JsonFormatter())
LOG.setLevel(logging.INFO)  # until LOG_LEVEL is read
METRICS_LOG: Final = _stdout_logger("backend_orchestrator.metrics", logging.Formatter("%(message)s"))
METRICS_LOG.setLevel(logging.INFO)
for _noisy in ("boto3", "botocore", "urllib3"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


# Every metric the function emits (the alarms and the dashboard watch some): <Action>Requested and these.
METRICS: Final = frozenset({"InstanceStarted", "InstanceStopped", "IdleSeconds", "UptimeSeconds", "UptimeHours",
    "BackendUnreachable", "StuckBusy", "OutOfTime", "Errors", "Rejected",
    *(f"{action.title().replace('_', '')}Requested" for action in Action)})  # fmt: skip


def emit_metrics(
    namespace: str, dimension: tuple[str, str] | None, metrics: Mapping[str, float], now: datetime
) -> None:
    """One CloudWatch Embedded Metric Format line, by the instance's ID or the group's name (`dimension`: its name and
    value); CloudWatch turns it into metrics, no API call."""
    name, value = dimension or ("InstanceId", "unknown")
    units = [{"Name": metric, "Unit": "Seconds" if metric.endswith("Seconds") else "Count"} for metric in metrics]
    directive = {"Namespace": namespace, "Dimensions": [[name]], "Metrics": units}
    document = {"_aws": {"Timestamp": int(now.timestamp() * 1000), "CloudWatchMetrics": [directive]}}
    METRICS_LOG.info(json.dumps({**document, name: value, **metrics}, separators=(",", ":")))


def log_invocation(fields: Mapping[str, Any], level: int, bug: Exception | None = None) -> None:
    """The invocation's one log line: what was asked, what happened, why, and how long it took (`fields`); its
    message is the error's, the answer's, or the action and its decision, and a warning lifts INFO to WARNING."""
    if "error" in fields:
        message = fields["error"]["message"]
    else:
        message = fields.get("message") or f"{fields['action']}: {fields.get('decision') or fields.get('state')}"
    level = max(level, logging.WARNING) if fields.get("warnings") else level
    clean = {key: value for key, value in fields.items() if value is not None}
    LOG.log(level, message, exc_info=bug, extra={"fields": clean})
