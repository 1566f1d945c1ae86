"""`make validate`, IAM half: lint the example policies and the template's role policy (as it renders for one instance
and for a group) with parliament.

Prints each finding; exits non-zero on any finding above LOW severity.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEVERITIES = ("INFO", "LOW", "MEDIUM", "HIGH", "CRITICAL")
# What the template's ${...} placeholders become, so that parliament sees a concrete ARN.
PLACEHOLDERS = {"${AWS::Partition}": "aws", "${AWS::Region}": "us-east-1", "${AWS::AccountId}": "123456789012",
                "${InstanceId}": "i-0abc123def4567890", "${AutoScalingGroupName}": "pyelli-backend"}  # fmt: skip
MODES = {"instance": "IsInstance", "group": "IsGroup"}  # the template's condition that holds in each mode
EXAMPLES = ("iam-policy-example.json", "iam-policy-group-example.json")
REFERENCES = {"KmsKeyArn": "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
              "Topic": "arn:aws:sns:us-east-1:123456789012:backend-orchestrator"}  # fmt: skip


def template_role_policies(template_path: Path = ROOT / "template.yaml") -> dict[str, dict[str, Any]]:
    """The role's inline policies from template.yaml as "name (mode)", as each renders for one instance and for a
    group, their placeholders filled in (a policy under !If is taken as it is when its condition holds)."""
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(str(template_path))
    policies = {}
    for mode, condition in MODES.items():
        for entry in json.loads(json.dumps(template["Resources"]["Role"]["Properties"]["Policies"])):
            policy = entry["Fn::If"][1] if "Fn::If" in entry else entry
            document = policy["PolicyDocument"]
            document["Statement"] = role_statements(document["Statement"], condition)
            for statement in document["Statement"]:
                statement["Resource"] = _concrete(statement["Resource"])
            policies[f"{policy['PolicyName']} ({mode})"] = document
    return policies


def role_statements(statements: list[Any], condition: str) -> list[dict[str, Any]]:
    """The statements as they render when `condition` holds and the other mode's does not: an !If on it gives its
    first branch, an !If on the other mode's condition its second (AWS::NoValue: left out)."""
    rendered = []
    for written in statements:
        statement = written
        if "Fn::If" in written:
            name, then, otherwise = written["Fn::If"]
            statement = then if name == condition else otherwise
        if statement != {"Ref": "AWS::NoValue"}:
            rendered.append(statement)
    return rendered


def _concrete(resource: Any) -> Any:
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        text = resource["Fn::Sub"]
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        return text
    if isinstance(resource, dict) and "Ref" in resource:
        return REFERENCES[resource["Ref"]]
    return resource


def findings(policy: dict[str, Any]) -> list[tuple[str, str, object]]:
    """(severity, issue, detail) for each of parliament's findings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parliament imports the deprecated pkg_resources
        import parliament

    analyzed = parliament.analyze_policy_string(json.dumps(policy))
    return [(parliament.config[f.issue]["severity"], f.issue, f.detail) for f in analyzed.findings]


def main() -> int:
    policies = {
        **{name: json.loads((ROOT / name).read_text()) for name in EXAMPLES},
        **{f"template.yaml Role {name}": policy for name, policy in template_role_policies().items()},
    }
    worst = 0
    for name, policy in policies.items():
        found = findings(policy)
        for severity, issue, detail in found:
            print(f"{name}: {severity} {issue}: {detail}")
            worst = max(worst, SEVERITIES.index(severity or "INFO"))
        print(f"{name}: parliament found {len(found)} issue(s)")
    return 1 if worst > SEVERITIES.index("LOW") else 0


if __name__ == "__main__":
    sys.exit(main())
