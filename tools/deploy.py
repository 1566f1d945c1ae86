"""`make deploy`: check, ask, remember, deploy. Standard library only, so that it runs before anything is installed.

    python3 -m tools.deploy prepare --python 3.12 --arch x86_64   # credentials, region, then the answers
    python3 -m tools.deploy run --sam .venv-deploy/bin/sam --python 3.12 --arch x86_64

`prepare` refuses at once, saying what to set, when no AWS credentials or no region can be found: nothing has been
installed or asked by then. A first deploy asks only what has no safe default (the instance, or an Auto Scaling
group and each instance's URL; the backend's URL, who may call the Function URL, an email for the alarms), or
reads them from INSTANCE_ID (or AUTO_SCALING_GROUP_NAME and BACKEND_INSTANCE_URL), BACKEND_BASE_URL, AUTH_TYPE and
ALARM_EMAIL; the answers go to samconfig.toml, which plain `sam deploy` reads too, with the stack
named backend-orchestrator unless STACK says otherwise. A public URL's bearer token never goes there: it is
written to .auth-token (mode 600, ignored by git) for the app team, and a later deploy without that file keeps
the stack's token. `run` deploys with the runtime and architecture the zip was built for.
"""

from __future__ import annotations

import argparse
import configparser
import getpass
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final, NamedTuple
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
SAMCONFIG = "samconfig.toml"  # in the checkout, beside template.yaml; ignored by git
TOKEN_FILE = ".auth-token"  # noqa: S105 - a file name: the token a public URL needs is written there, mode 600
DEFAULT_STACK = "backend-orchestrator"
INSTANCE_ID = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
GROUP_NAME = re.compile(r"[!-9;-~]{1,255}")  # an Auto Scaling group's: printable ASCII but the colon
INSTANCE_URL = re.compile(r"https?://[^\s\"\\]*\{(private_ip|private_dns_name|instance_id)\}[^\s\"\\]*")
EMAIL = re.compile(r"[^@\s\"\\]+@[^@\s\"\\]+\.[^@\s\"\\]+")
TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{32,}")  # the template's AuthToken pattern
AUTH_TYPES = ("AWS_IAM", "NONE")
IMDS = "http://169.254.169.254/latest/api/token"  # an EC2 instance's role, where this runs on one
# What a profile needs to hold to give credentials: keys, SSO, `aws login`, a process, a role to assume.
PROFILE_SOURCES = ("aws_access_key_id", "sso_session", "sso_start_url", "login_session", "credential_process",
                   "role_arn", "web_identity_token_file")  # fmt: skip

Ask = Callable[[str, bool], str]  # (prompt, secret) -> the answer; EOFError when there is none


class DeployError(Exception):
    """make deploy cannot go on; the message says what to set or fix."""


# --- Before anything is installed: credentials and a region -------------------------------------------------------
def credentials_found(environ: Mapping[str, str], home: Path, probe_instance_role: bool = True) -> str | None:
    """Where the AWS tools will find credentials (the chain boto3 and the SAM CLI follow), or None."""
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        return "AWS_ACCESS_KEY_ID"
    if environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") and environ.get("AWS_ROLE_ARN"):
        return "AWS_WEB_IDENTITY_TOKEN_FILE"
    profile = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    config, credentials = _profile(environ, home, profile)
    if any(source in {**config, **credentials} for source in PROFILE_SOURCES):
        return f"profile {profile}"
    if environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "the container's role"
    if probe_instance_role and environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        request = urllib.request.Request(IMDS, method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        try:
            with urllib.request.urlopen(request, timeout=1):  # noqa: S310
                return "the EC2 instance's role"
        except (OSError, ValueError):
            pass
    return None


def region_found(environ: Mapping[str, str], home: Path, saved: str | None = None) -> str | None:
    """The region the deploy goes to: AWS_REGION, AWS_DEFAULT_REGION, the last deploy's, or the profile's."""
    profile = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    named = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or saved
    return named or _profile(environ, home, profile)[0].get("region")


def _profile(environ: Mapping[str, str], home: Path, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """A profile's settings in the config file and in the credentials file (either may lack it)."""
    config_file = Path(environ.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    credentials_file = Path(environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    found = []
    for path, section in ((config_file, name if name == "default" else f"profile {name}"), (credentials_file, name)):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except (configparser.Error, UnicodeDecodeError, OSError):
            parser.clear()
        found.append(dict(parser[section]) if parser.has_section(section) else {})
    return found[0], found[1]


def check(environ: Mapping[str, str], home: Path, saved_region: str | None = None) -> tuple[str, str]:
    """(where the credentials come from, the region), or a DeployError that says what to set."""
    problems = []
    credentials = credentials_found(environ, home)
    if credentials is None:
        problems.append(
            "No AWS credentials found. Set AWS_PROFILE to a profile of ~/.aws/config (made by `aws configure sso` "
            "or `aws configure`), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, for the account of the instance."
        )
    region = region_found(environ, home, saved_region)
    if region is None:
        problems.append(
            "No AWS region. Set AWS_REGION to the instance's region (e.g. export AWS_REGION=eu-central-1); "
            "AWS_DEFAULT_REGION and a profile's region work too."
        )
    if problems or credentials is None or region is None:
        raise DeployError(" ".join(problems) + " Nothing was installed or asked yet.")
    return credentials, region


# --- The answers, asked once and saved ----------------------------------------------------------------------------
class Saved(NamedTuple):
    """What samconfig.toml holds: the stack, its region, and each parameter override."""

    stack: str | None = None
    region: str | None = None
    overrides: Mapping[str, str] = MappingProxyType({})

    @classmethod
    def read(cls, root: Path) -> Saved:
        path = root / SAMCONFIG
        if not path.exists():
            return cls()
        try:
            table = tomllib.loads(path.read_text())["default"]["deploy"]["parameters"]
            given = table.get("parameter_overrides", "")
            pairs = given if isinstance(given, list) else shlex.split(given)
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
            raise DeployError(f"{SAMCONFIG} cannot be read ({error}): fix it, or delete it to be asked anew.") from None
        overrides = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        return cls(table.get("stack_name"), table.get("region"), overrides)

    def write(self, root: Path) -> None:
        """samconfig.toml as the SAM CLI reads it: the stack, its region and every parameter override."""
        pairs = " ".join(quoted(key, value) for key, value in self.overrides.items())
        (root / SAMCONFIG).write_text(
            "# Written by make deploy (tools/deploy.py): edit a value here, or delete the file to be asked anew.\n"
            "# Plain `sam deploy` reads it too. A public URL's bearer token is never written here (.auth-token).\n"
            "version = 0.1\n\n[default.deploy.parameters]\n"
            f"stack_name = {json.dumps(self.stack)}\nregion = {json.dumps(self.region)}\n"
            'capabilities = "CAPABILITY_IAM"\nresolve_s3 = true\nconfirm_changeset = false\n'
            f"parameter_overrides = {json.dumps(pairs)}\n"
        )


# The questions a first deploy asks after the target (target()), as {parameter: (variable that answers it, question,
# default; None: none)}; BackendInstanceUrl only for a group.
QUESTIONS: dict[str, tuple[str, str, str | None]] = {
    "BackendInstanceUrl": (
        "BACKEND_INSTANCE_URL", "Each instance's own base URL as the function reaches it (e.g. http://{private_ip}:8000)",
        None,
    ),
    "BackendBaseUrl": (
        "BACKEND_BASE_URL", "The backend's base URL as the function reaches it (e.g. http://10.0.1.50:8000)", None
    ),
    "FunctionUrlAuthType": (
        "AUTH_TYPE", "Who may call the Function URL: AWS_IAM (the app signs with its role) or NONE (public, with a "
        "bearer token)", "AWS_IAM",
    ),
    "AlarmEmail": ("ALARM_EMAIL", "An email for the alarms and the start/stop notices (empty: none for now)", ""),
}  # fmt: skip


def problem(parameter: str, value: str) -> str | None:
    """What is wrong with an answer, or None."""
    if '"' in value or "\\" in value:
        return "quotes and backslashes cannot be saved in samconfig.toml"
    if parameter == "InstanceId" and not INSTANCE_ID.fullmatch(value):
        return "expected i- and 8 or 17 lowercase hex digits, e.g. i-0abc123def4567890"
    if parameter == "AutoScalingGroupName" and not GROUP_NAME.fullmatch(value):
        return "expected the group's name (not its ARN): printable ASCII without spaces or colons"
    if parameter == "BackendInstanceUrl" and not INSTANCE_URL.fullmatch(value):
        return "expected an http(s) URL naming {private_ip}, {private_dns_name} or {instance_id}"
    if parameter == "BackendBaseUrl":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.query:
            return "expected an http(s) URL without a user, password or query, e.g. http://10.0.1.50:8000"
    if parameter == "FunctionUrlAuthType" and value not in AUTH_TYPES:
        return "answer AWS_IAM or NONE"
    if parameter == "AlarmEmail" and value and not EMAIL.fullmatch(value):
        return "expected an email address, or nothing"
    return None


def target(saved: Mapping[str, str], environ: Mapping[str, str], ask: Ask | None) -> dict[str, str]:
    """The instance (InstanceId) or the Auto Scaling group (AutoScalingGroupName): from INSTANCE_ID or
    AUTO_SCALING_GROUP_NAME, else the last deploy's, else asked (an answer that starts with i- names an instance).
    The other one is cleared where a last deploy set it."""
    group = environ.get("AUTO_SCALING_GROUP_NAME", "").strip()
    value = group or environ.get("INSTANCE_ID", "").strip() or saved.get("AutoScalingGroupName") or ""
    value = value or saved.get("InstanceId") or ""
    question = "The backend's EC2 instance ID (i-...), or its Auto Scaling group's name: "
    while True:
        parameter = "AutoScalingGroupName" if group or (value and not value.startswith("i-")) else "InstanceId"
        wrong = problem(parameter, value) if value else None
        if value and not wrong:
            break
        if ask is None:
            raise DeployError(f"{'AUTO_SCALING_GROUP_NAME' if group else 'INSTANCE_ID'}={value!r}: {wrong}." if value
                              else NO_TARGET)  # fmt: skip
        if value:
            print(f"  {value!r}: {wrong}.", file=sys.stderr)
        group, value = "", ask(question, False).strip()
    cleared = {key: "" for key in ("InstanceId", "AutoScalingGroupName", "BackendInstanceUrl") if saved.get(key)}
    return {**cleared, parameter: value}


NO_TARGET: Final = (
    "INSTANCE_ID is not set: a first deploy run outside a terminal needs INSTANCE_ID and BACKEND_BASE_URL (make "
    "deploy INSTANCE_ID=i-0abc123def4567890 BACKEND_BASE_URL=http://10.0.1.50:8000), or AUTO_SCALING_GROUP_NAME, "
    "BACKEND_INSTANCE_URL and BACKEND_BASE_URL for a group."
)


def answers(saved: Mapping[str, str], environ: Mapping[str, str], ask: Ask | None) -> dict[str, str]:
    """The target's answer (target()), then each question's: its variable, else the last deploy's, else asked.
    Without `ask` (not a terminal) a default stands in, and a question without one is a DeployError that names the
    variables to set."""
    found = target(saved, environ, ask)
    for parameter, (variable, question, default) in QUESTIONS.items():
        if parameter == "BackendInstanceUrl" and not found.get("AutoScalingGroupName"):
            continue  # an instance's URL is BACKEND_BASE_URL
        value = environ.get(variable, "").strip() or saved.get(parameter)
        if value is None and ask is None:
            value = default
        while value is None or (wrong := problem(parameter, value)):
            if ask is None:
                raise DeployError(f"{variable} is not set: set it (make deploy {variable}=...)." if value is None
                                  else f"{variable}={value!r}: {wrong}.")  # fmt: skip
            if value is not None:
                print(f"  {value!r}: {wrong}.", file=sys.stderr)
            value = ask(f"{question}{f' [{default}]' if default else ''}: ", False).strip() or default
        found[parameter] = value
    return found


def bearer_token(environ: Mapping[str, str], ask: Ask | None, path: Path) -> str:
    """A public URL's token: AUTH_TOKEN, one typed, or a new one; written to `path`, mode 600."""
    token = environ.get("AUTH_TOKEN", "").strip()
    while not TOKEN.fullmatch(token):
        if token:
            print("  at least 32 characters of A-Z a-z 0-9 . _ ~ + / = -", file=sys.stderr)
        typed = ask("A bearer token for the app (hidden; Enter makes one): ", True).strip() if ask else ""
        token = typed or secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def prepare(root: Path, environ: Mapping[str, str], home: Path, *, ask: Ask | None, python: str, arch: str) -> Saved:
    """Check credentials and region, ask what is missing, and save it all in samconfig.toml."""
    saved = Saved.read(root)
    _, region = check(environ, home, saved.region)
    overrides = {**saved.overrides, **answers(saved.overrides, environ, ask)}
    overrides |= {"Runtime": f"python{python}", "Architecture": arch}  # what make package builds, always
    if overrides["FunctionUrlAuthType"] == "NONE" and saved.overrides.get("FunctionUrlAuthType") != "NONE":
        bearer_token(environ, ask, root / TOKEN_FILE)  # a first public URL: the stack has no token to keep
        told = "set it as the app's BACKEND_TOKEN, then delete the file; later deploys keep the stack's token"
        print(f"The app's bearer token is in {TOKEN_FILE} (mode 600, ignored by git): {told}.", file=sys.stderr)
    chosen = Saved(environ.get("STACK") or saved.stack or DEFAULT_STACK, region, overrides)
    chosen.write(root)
    return chosen


def sam_command(root: Path, sam: str, environ: Mapping[str, str], *, python: str, arch: str) -> list[str]:
    """`sam deploy` with every saved answer, the packaged runtime and architecture, and a new bearer token."""
    saved = Saved.read(root)
    targets = (saved.overrides.get("InstanceId"), saved.overrides.get("AutoScalingGroupName"))
    if saved.stack is None or saved.region is None or not any(targets):
        raise DeployError(f"{SAMCONFIG} holds no answers: run make deploy, which asks first.")
    overrides = {**saved.overrides, "Runtime": f"python{python}", "Architecture": arch}
    token_path = root / TOKEN_FILE
    token = environ.get("AUTH_TOKEN", "").strip() or (token_path.read_text().strip() if token_path.exists() else "")
    if token and overrides.get("FunctionUrlAuthType") == "NONE":
        overrides["AuthToken"] = token  # without one, CloudFormation keeps the stack's own (UsePreviousValue)
    return [sam, "deploy", "--template-file", str(root / "template.yaml"), "--stack-name", saved.stack,
            "--region", saved.region, "--capabilities", "CAPABILITY_IAM", "--resolve-s3", "--no-confirm-changeset",
            "--no-fail-on-empty-changeset", "--parameter-overrides",
            *(quoted(key, value) for key, value in overrides.items())]  # fmt: skip


def quoted(key: str, value: str) -> str:
    """A parameter override as the SAM CLI reads it, an empty value included (answers hold no quotes)."""
    return f'{key}="{value}"'


def _ask(prompt: str, secret: bool) -> str:
    return getpass.getpass(prompt) if secret else input(prompt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("check", "prepare", "run"))
    parser.add_argument("--python", default="3.12", help="the Lambda runtime the zip is built for (LAMBDA_PYTHON)")
    parser.add_argument("--arch", default="x86_64", help="its architecture (LAMBDA_ARCH)")
    parser.add_argument("--sam", default=str(ROOT / ".venv-deploy" / "bin" / "sam"))
    args = parser.parse_args()
    try:
        if args.step == "check":
            credentials, region = check(os.environ, Path.home(), Saved.read(ROOT).region)
            print(f"AWS credentials from {credentials}, region {region}")
        elif args.step == "prepare":
            ask = _ask if sys.stdin.isatty() else None
            prepare(ROOT, os.environ, Path.home(), ask=ask, python=args.python, arch=args.arch)
        else:
            command = sam_command(ROOT, args.sam, os.environ, python=args.python, arch=args.arch)
            return subprocess.run(command, check=False).returncode
    except DeployError as error:
        print(f"make deploy: {error}", file=sys.stderr)
        return 2
    except (EOFError, KeyboardInterrupt):
        print("\nmake deploy: stopped; nothing was saved.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
