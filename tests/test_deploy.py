"""make deploy and make preflight from a newcomer's shell: what is missing is said before anything is installed or
asked, a first deploy asks four questions and remembers them, and the runtime deployed is the one packaged."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tools import deploy

ROOT = Path(__file__).resolve().parent.parent
INSTANCE = "i-0abc123def4567890"
URL = "http://10.0.1.50:8000"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "eu-central-1"}
NO_NETWORK = {"AWS_EC2_METADATA_DISABLED": "true"}  # no instance role to ask for: the tests reach no network


class Terminal:
    """Answers the questions in order, and records each prompt (and whether its answer was hidden)."""

    def __init__(self, *replies: str) -> None:
        self.replies = list(replies)
        self.prompts: list[tuple[str, bool]] = []

    def __call__(self, prompt: str, secret: bool) -> str:
        self.prompts.append((prompt, secret))
        if not self.replies:
            raise EOFError
        return self.replies.pop(0)


def bare_environment(home: Path) -> dict[str, str]:
    """A newcomer's shell: no AWS settings at all, an empty home."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def test_make_deploy_without_credentials_or_region_says_what_to_set_before_installing_anything(
    tmp_path: Path,
) -> None:
    for name in ("Makefile", "tools"):  # a checkout with nothing built: no .venv, no .venv-deploy, no dist
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    done = subprocess.run(
        [shutil.which("make") or "make", "deploy", f"PYTHON={sys.executable}"],
        cwd=tmp_path,
        env=bare_environment(tmp_path) | {"HOME": str(tmp_path / "home")} | NO_NETWORK,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    for variable in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_REGION"):
        assert variable in done.stderr
    assert "Nothing was installed or asked yet" in done.stderr
    made = {path.name for path in tmp_path.iterdir()}
    assert made == {"Makefile", "tools"}  # no venv, no zip, no samconfig.toml


@pytest.mark.parametrize(
    ("environ", "default_profile", "where"),
    [
        pytest.param({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, True, "AWS_ACCESS_KEY_ID", id="keys"),
        pytest.param({"AWS_PROFILE": "sso"}, True, "profile sso", id="sso-profile"),
        pytest.param({}, True, "profile default", id="default-profile-keys"),
        pytest.param(
            {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x"}, False, "the container's role", id="ecs-task-role"
        ),
    ],
)
def test_credentials_are_found_where_the_aws_tools_look(
    tmp_path: Path, environ: dict[str, str], default_profile: bool, where: str
) -> None:
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "config").write_text("[profile sso]\nsso_session = corp\nregion = eu-west-1\n")
    if default_profile:
        (aws / "credentials").write_text("[default]\naws_access_key_id = x\naws_secret_access_key = y\n")
    assert deploy.credentials_found(environ | NO_NETWORK, tmp_path) == where


def test_a_profile_without_credentials_is_no_credentials(tmp_path: Path) -> None:
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[profile empty]\nregion = eu-west-1\n")
    assert deploy.credentials_found({"AWS_PROFILE": "empty"} | NO_NETWORK, tmp_path) is None
    assert deploy.region_found({"AWS_PROFILE": "empty"}, tmp_path) == "eu-west-1"  # its region still counts


def test_a_first_deploy_with_aws_iam_asks_four_questions_and_no_token(tmp_path: Path) -> None:
    terminal = Terminal(INSTANCE, URL, "", "ops@example.com")  # Enter: AWS_IAM, the default
    chosen = deploy.prepare(tmp_path, KEYS, tmp_path, ask=terminal, python="3.13", arch="arm64")
    assert len(terminal.prompts) == 4
    assert not any(secret for _, secret in terminal.prompts)  # no token asked
    assert "[AWS_IAM]" in terminal.prompts[2][0]
    assert (chosen.stack, chosen.region) == ("backend-orchestrator", "eu-central-1")
    saved = tomllib.loads((tmp_path / "samconfig.toml").read_text())["default"]["deploy"]["parameters"]
    assert (saved["stack_name"], saved["region"], saved["capabilities"]) == (
        "backend-orchestrator",
        "eu-central-1",
        "CAPABILITY_IAM",
    )
    assert deploy.Saved.read(tmp_path).overrides == {
        "InstanceId": INSTANCE,
        "BackendBaseUrl": URL,
        "FunctionUrlAuthType": "AWS_IAM",
        "AlarmEmail": "ops@example.com",
        "Runtime": "python3.13",
        "Architecture": "arm64",
    }
    assert not (tmp_path / ".auth-token").exists()


def test_the_answers_are_remembered_and_the_runtime_deployed_is_the_one_packaged(tmp_path: Path) -> None:
    deploy.prepare(tmp_path, KEYS, tmp_path, ask=Terminal(INSTANCE, URL, "", ""), python="3.12", arch="x86_64")
    again = Terminal()
    deploy.prepare(tmp_path, KEYS, tmp_path, ask=again, python="3.13", arch="x86_64")
    assert again.prompts == []  # nothing asked twice
    command = deploy.sam_command(tmp_path, "sam", {}, python="3.13", arch="x86_64")
    overrides = command[command.index("--parameter-overrides") + 1 :]
    assert 'Runtime="python3.13"' in overrides
    assert 'Architecture="x86_64"' in overrides
    assert f'InstanceId="{INSTANCE}"' in overrides
    assert 'AlarmEmail=""' in overrides  # answered empty: said so, not left to the stack's last value
    assert not any(item.startswith("AuthToken") for item in overrides)
    assert command[command.index("--stack-name") + 1] == "backend-orchestrator"
    assert command[command.index("--region") + 1] == "eu-central-1"


def test_a_public_url_gets_a_token_that_is_never_saved_in_samconfig(tmp_path: Path) -> None:
    terminal = Terminal(INSTANCE, URL, "NONE", "", "")  # Enter at the token: one is made
    deploy.prepare(tmp_path, KEYS, tmp_path, ask=terminal, python="3.12", arch="x86_64")
    assert terminal.prompts[-1][1] is True  # the token is asked hidden
    token_file = tmp_path / ".auth-token"
    token = token_file.read_text().strip()
    assert deploy.TOKEN.fullmatch(token)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in (tmp_path / "samconfig.toml").read_text()
    command = deploy.sam_command(tmp_path, "sam", {}, python="3.12", arch="x86_64")
    assert f'AuthToken="{token}"' in command
    token_file.unlink()  # stored in the app's secrets: the stack keeps its token (CloudFormation's previous value)
    command = deploy.sam_command(tmp_path, "sam", {}, python="3.12", arch="x86_64")
    assert not any(item.startswith("AuthToken") for item in command)


def test_a_wrong_answer_is_asked_again_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    terminal = Terminal("i-123", INSTANCE, "backend:8000", URL, "", "")
    deploy.prepare(tmp_path, KEYS, tmp_path, ask=terminal, python="3.12", arch="x86_64")
    assert len(terminal.prompts) == 6
    said = capsys.readouterr().err
    assert "'i-123': expected i- and 8 or 17 lowercase hex digits" in said
    assert "'backend:8000': expected an http(s) URL" in said


def test_a_scripted_deploy_asks_nothing_and_names_what_it_lacks(tmp_path: Path) -> None:
    with pytest.raises(deploy.DeployError, match=r"INSTANCE_ID is not set: .* needs INSTANCE_ID and BACKEND_BASE_URL"):
        deploy.prepare(tmp_path, KEYS, tmp_path, ask=None, python="3.12", arch="x86_64")
    assert not (tmp_path / "samconfig.toml").exists()  # nothing saved
    environ = KEYS | {"INSTANCE_ID": INSTANCE, "BACKEND_BASE_URL": URL, "STACK": "orchestrator-test"}
    chosen = deploy.prepare(tmp_path, environ, tmp_path, ask=None, python="3.12", arch="x86_64")
    assert chosen.stack == "orchestrator-test"
    assert chosen.overrides["FunctionUrlAuthType"] == "AWS_IAM"
    with pytest.raises(deploy.DeployError, match="AUTH_TYPE='PUBLIC': answer AWS_IAM or NONE"):
        deploy.prepare(tmp_path, {**environ, "AUTH_TYPE": "PUBLIC"}, tmp_path, ask=None, python="3.12", arch="x86_64")


def test_make_preflight_without_credentials_says_what_to_set(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.preflight"],
        cwd=ROOT,
        env=bare_environment(tmp_path) | NO_NETWORK | {"PYTHONPATH": f"{ROOT / 'lambda'}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "No AWS credentials found. Set AWS_PROFILE" in done.stderr
    assert "You must specify a region" not in done.stderr


def test_the_saved_region_is_the_one_preflight_uses(tmp_path: Path) -> None:
    deploy.Saved("orchestrator-test", "ap-southeast-2", {"InstanceId": INSTANCE}).write(tmp_path)
    saved = deploy.Saved.read(tmp_path)
    keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    assert deploy.check(keys, tmp_path, saved.region) == ("AWS_ACCESS_KEY_ID", "ap-southeast-2")
    assert deploy.check({**keys, "AWS_REGION": "eu-west-1"}, tmp_path, saved.region)[1] == "eu-west-1"


def test_a_first_deploy_of_a_group_asks_for_each_instances_url_too(tmp_path: Path) -> None:
    terminal = Terminal("pyelli-backend", "http://{private_ip}:8000", "http://internal-lb.example.com", "", "")
    deploy.prepare(tmp_path, KEYS, tmp_path, ask=terminal, python="3.12", arch="x86_64")
    assert len(terminal.prompts) == 5
    assert "Auto Scaling group" in terminal.prompts[0][0]
    overrides = deploy.Saved.read(tmp_path).overrides
    assert (overrides["AutoScalingGroupName"], overrides["BackendInstanceUrl"]) == (
        "pyelli-backend",
        "http://{private_ip}:8000",
    )
    assert "InstanceId" not in overrides  # the template's default, empty
    command = deploy.sam_command(tmp_path, "sam", {}, python="3.12", arch="x86_64")
    assert 'AutoScalingGroupName="pyelli-backend"' in command


def test_a_deploy_that_moves_from_a_group_to_an_instance_clears_the_group(tmp_path: Path) -> None:
    group = KEYS | {"AUTO_SCALING_GROUP_NAME": "pyelli-backend", "BACKEND_INSTANCE_URL": "http://{private_ip}:8000",
                    "BACKEND_BASE_URL": URL}  # fmt: skip
    deploy.prepare(tmp_path, group, tmp_path, ask=None, python="3.12", arch="x86_64")
    deploy.prepare(tmp_path, KEYS | {"INSTANCE_ID": INSTANCE}, tmp_path, ask=None, python="3.12", arch="x86_64")
    overrides = deploy.Saved.read(tmp_path).overrides
    assert (overrides["InstanceId"], overrides["AutoScalingGroupName"], overrides["BackendInstanceUrl"]) == (
        INSTANCE,
        "",
        "",
    )


def test_a_scripted_group_deploy_names_a_bad_url(tmp_path: Path) -> None:
    group = KEYS | {"AUTO_SCALING_GROUP_NAME": "pyelli-backend", "BACKEND_INSTANCE_URL": "http://10.0.1.50:8000",
                    "BACKEND_BASE_URL": URL}  # fmt: skip
    with pytest.raises(deploy.DeployError, match=r"BACKEND_INSTANCE_URL='http://10.0.1.50:8000': expected an http"):
        deploy.prepare(tmp_path, group, tmp_path, ask=None, python="3.12", arch="x86_64")
    with pytest.raises(deploy.DeployError, match=r"AUTO_SCALING_GROUP_NAME='a:b': expected the group's name"):
        deploy.prepare(tmp_path, {**group, "AUTO_SCALING_GROUP_NAME": "a:b"}, tmp_path, ask=None, python="3.12",
                       arch="x86_64")  # fmt: skip
