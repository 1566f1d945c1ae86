"""`make preflight`: invoke the deployed function's preflight and print its checks as a table.

The function is FUNCTION=<name>, or the FunctionName output of the stack (STACK=<name>, default the
stack_name in samconfig.toml, else backend-orchestrator), in AWS_REGION or the region samconfig.toml saved.
NOTIFY=true also sends a test notification. Exits 1 when any check failed, 2 when the function could not be
invoked (the message says what to set).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from tools import deploy

ROOT = Path(__file__).resolve().parent.parent
MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def render(body: dict[str, Any]) -> str:
    """The preflight's answer as a table a person reads: one check a row, with the fix under a failure."""
    if "checks" not in body:
        return f"preflight did not run: {json.dumps(body.get('error', body))}"
    target = body.get("instance_id") or body.get("auto_scaling_group_name") or "(no instance)"
    lines = [f"preflight of {target}", ""]
    for check in body["checks"]:
        detail = textwrap.wrap(check["detail"], 90) or [""]
        lines.append(f"  {MARKS.get(check['status'], check['status']):4}  {check['check']:18} {detail[0]}")
        lines += [f"  {'':4}  {'':18} {more}" for more in detail[1:]]
        if check.get("fix") and check["status"] in ("fail", "warn"):
            fix = textwrap.wrap(check["fix"], 87)
            lines += [f"  {'':4}  {'':18} {'->' if i == 0 else '  '} {part}" for i, part in enumerate(fix)]
    verdict = "all checks passed" if body.get("ok") else "some checks FAILED: fix them, then run make preflight again"
    lines += ["", verdict]
    return "\n".join(lines)


def function_name(region: str, stack: str | None) -> str:
    """FUNCTION, or the FunctionName output of the stack (STACK, the last deploy's, or backend-orchestrator)."""
    if os.environ.get("FUNCTION"):
        return os.environ["FUNCTION"]
    import boto3

    stack = os.environ.get("STACK") or stack or deploy.DEFAULT_STACK
    cloudformation = boto3.client("cloudformation", region_name=region)
    outputs = cloudformation.describe_stacks(StackName=stack)["Stacks"][0].get("Outputs", [])
    return str(next(output["OutputValue"] for output in outputs if output["OutputKey"] == "FunctionName"))


def main() -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    event = {"action": "preflight", "notify": os.environ.get("NOTIFY", "").lower() == "true"}
    try:
        saved = deploy.Saved.read(ROOT)
        _, region = deploy.check(os.environ, Path.home(), saved.region)  # what to set, before any call
        name = function_name(region, saved.stack)
        client = boto3.client("lambda", region_name=region)
        answer = client.invoke(FunctionName=name, Payload=json.dumps(event).encode())
    except deploy.DeployError as error:
        print(f"make preflight: {error}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError, StopIteration) as error:
        hint = "set FUNCTION=<name>, or STACK=<stack> and the stack's region in AWS_REGION"
        print(f"make preflight: could not invoke the function's preflight ({error}): {hint}.", file=sys.stderr)
        return 2
    body = json.loads(answer["Payload"].read())
    print(render(body))
    return 0 if body.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
