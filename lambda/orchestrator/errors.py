"""Every answer the function gives that is not a success: an exception tree whose classes carry their HTTP status,
their one code and their headers (as Chalice's BadRequestError.STATUS_CODE), listed once in ERRORS. Each message
says what went wrong and what to do."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from orchestrator.words import Action

RETRY_AFTER_SECONDS: Final = 10
CAPACITY_RETRY_AFTER_SECONDS: Final = 30  # EC2 capacity comes back in minutes, not seconds
RECOMMENDED_TIMEOUT_SECONDS: Final = 60  # the template's: every action with its retries and waits


class OrchestratorError(Exception):
    """An answer to the caller that says what went wrong and what to do. A subclass names its HTTP status, its code
    and its headers as class keywords; one without a code of its own (BadRequestError) is only a family."""

    STATUS_CODE: ClassVar[int] = 500
    CODE: ClassVar[str] = "internal_error"  # a bug: the log has the traceback
    HEADERS: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, status: int = 0, code: str = "", headers: Mapping[str, str] | None = None) -> None:
        super().__init_subclass__()
        cls.STATUS_CODE, cls.CODE, cls.HEADERS = status or cls.STATUS_CODE, code, headers or cls.HEADERS

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


RETRY_AFTER: Final = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class BadRequestError(OrchestratorError, status=400): ...  # the request itself is wrong: a subclass says how


class InvalidEventError(BadRequestError, code="invalid_event"): ...


class UnsupportedEventError(BadRequestError, code="unsupported_event"): ...


class MalformedJsonError(BadRequestError, code="malformed_json"): ...


class InvalidBase64Error(BadRequestError, code="invalid_base64"): ...


class InvalidBodyError(BadRequestError, code="invalid_body"): ...


class InvalidActionError(BadRequestError, code="invalid_action"): ...


class UnknownActionError(BadRequestError, code="unknown_action"): ...


class InvalidHoldError(BadRequestError, code="invalid_hold"): ...  # the message names the field; nothing written


class UnauthorizedError(OrchestratorError, status=401, code="unauthorized", headers={"WWW-Authenticate": "Bearer"}): ...


class ForbiddenError(OrchestratorError, status=403, code="action_not_allowed"): ...


class MethodNotAllowedError(
    OrchestratorError, status=405, code="method_not_allowed", headers={"Allow": "GET, POST"}
): ...


class HeldStoppedError(OrchestratorError, status=409, code="held_stopped"): ...  # until the hold ends or is released


class InstanceGoneError(OrchestratorError, status=409, code="instance_terminated"): ...  # shutting down, terminated


class GroupMaxSizeZeroError(OrchestratorError, status=409, code="group_max_size_zero"): ...  # cannot be woken


class PayloadTooLargeError(OrchestratorError, status=413, code="payload_too_large"): ...


class ConfigError(OrchestratorError, code="config_error"): ...


class InstanceNotFoundError(ConfigError, code="instance_not_found"): ...  # INSTANCE_ID's fault: a 500, as config_error


class GroupNotFoundError(ConfigError, code="group_not_found"): ...  # AUTO_SCALING_GROUP_NAME's fault


class StillStoppingError(OrchestratorError, status=503, code="still_stopping", headers=RETRY_AFTER): ...


class AwsError(OrchestratorError, status=502, code="aws_error"):
    """An AWS API error the function cannot act on; `aws_error_code` is AWS's own code, when AWS answered."""

    def __init__(self, message: str, *, aws_error_code: str | None = None, **details: Any):
        if aws_error_code is not None:
            details["aws_error_code"] = aws_error_code
        super().__init__(message, **details)
        self.aws_error_code = aws_error_code


class AccessDeniedError(AwsError, code="aws_access_denied"): ...  # `iam_action` names the missing permission


class AwsUnreachableError(AwsError, code="aws_unreachable"): ...


class InsufficientCapacityError(
    AwsError, status=503, code="insufficient_capacity", headers={"Retry-After": str(CAPACITY_RETRY_AFTER_SECONDS)}
): ...  # transient: EC2 has no capacity for the instance's type in its zone right now


class OutOfTimeError(OrchestratorError, status=503, code="out_of_time", headers=RETRY_AFTER):
    """Too little of the invocation's time is left for the next step; nothing half-done, safe to retry."""

    def __init__(self, step: str, left_seconds: float, needed_seconds: float) -> None:
        self.step = step
        self.brief = f"{max(left_seconds, 0):.1f}s left, it may take {needed_seconds:.1f}s"
        super().__init__(
            f"Out of time before {step} ({self.brief}). Retry after {RETRY_AFTER_SECONDS} seconds; if this "
            "repeats, raise the function's timeout (docs/deploy.md's time bounds table says what each action needs)."
        )


class TimeoutTooShortError(ConfigError, code="timeout_too_short"):
    """The invocation's whole time cannot hold one attempt of each call the action needs: a retry cannot succeed."""

    def __init__(self, action: Action, whole_seconds: float, needed_seconds: float) -> None:
        super().__init__(
            f"The function's timeout ({whole_seconds:.1f} s) is too short for {action}: one attempt of each call it "
            f"makes needs {needed_seconds:.1f} s. Raise the function's Timeout (Configuration > General "
            f"configuration in the Lambda console, or Timeout in the template) to {RECOMMENDED_TIMEOUT_SECONDS} s, "
            "which also fits retries and waits.",
            timeout_seconds=round(whole_seconds, 1),
            needed_seconds=round(needed_seconds, 1),
        )


def _family(error: type[OrchestratorError]) -> list[type[OrchestratorError]]:
    return [error, *(member for child in error.__subclasses__() for member in _family(child))]


# Every answer the function gives that is not a success, by its code (docs/deploy.md's troubleshooting table).
ERRORS: Final = {error.CODE: error for error in _family(OrchestratorError) if error.CODE}
