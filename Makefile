# make test: what CI runs. Everything installs into .venv from pinned requirements.
.PHONY: test lint typecheck unit demo serve app screenshots bench package validate deploy preflight clean venv lock

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
LAMBDA_PYTHON ?= 3.12
LAMBDA_ARCH ?= x86_64
ZIP := dist/lambda_backend_orchestrator.zip
DEPLOY_VENV := .venv-deploy

test: lint typecheck unit

venv: $(STAMP)

$(STAMP): requirements-dev.txt lambda/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite on PYTEST_WORKERS processes: much of its time is spent waiting on real sockets and timeouts, so more
# workers wait better, until they compete for CPU. Beside another make test on this 2-core machine (773 tests):
# 2 workers took 147-149 s, 3 took 133-134 s, 4 took 128-132 s.
PYTEST_WORKERS ?= 3
unit: $(STAMP)
	$(BIN)/pytest --numprocesses $(PYTEST_WORKERS) --dist loadgroup

# The whole life cycle on 127.0.0.1, no AWS account: moto, a reference backend, a local Function URL.
demo: $(STAMP)
	PYTHONPATH=lambda:. $(BIN)/python -m tools.demo

# The same pieces left running, to develop the app against (BACKEND_START_LAMBDA_URL=<printed URL>); VERBOSE=1 prints
# the function's own log lines. Ctrl-C, or a SIGTERM to make, stops them all.
serve: $(STAMP)
	exec env PYTHONPATH=lambda:. $(BIN)/python -m tools.demo --serve $(if $(VERBOSE),--verbose)

# The Streamlit page (examples/streamlit_app.py) on 127.0.0.1 against the same sandbox; Ctrl-C stops it all.
app: $(STAMP)
	exec env PYTHONPATH=lambda:. $(BIN)/python -m tools.demo --app --check-every 10 --idle-timeout 120 \
		$(if $(VERBOSE),--verbose)

# PNGs of the page before, during and after a cold wake, in build/screenshots/ (UPDATE_DOCS=1: docs/images/). Needs
# Debian's chromium and chromium-driver, which it installs with apt-get when run as root; not part of make test.
screenshots: $(STAMP)
	PYTHONPATH=lambda:. $(BIN)/python -m tools.screenshots

# The deployment zip, for Lambda's platform: make package LAMBDA_PYTHON=3.13 LAMBDA_ARCH=arm64
package: $(STAMP)
	$(BIN)/python -m tools.package --python $(LAMBDA_PYTHON) --arch $(LAMBDA_ARCH) --output $(ZIP)

# Lint template.yaml (cfn-lint) and the IAM policies (parliament: nothing above LOW).
validate: $(STAMP)
	$(BIN)/cfn-lint template.yaml
	$(BIN)/python -m tools.lint_policy

# Deploy with AWS SAM (docs/deploy.md, "Deploy in ten minutes"). Before anything is installed: AWS credentials and a
# region, then a first deploy's four questions (or INSTANCE_ID, BACKEND_BASE_URL, AUTH_TYPE, ALARM_EMAIL), saved in
# samconfig.toml. Then the zip for LAMBDA_PYTHON and LAMBDA_ARCH, the linters, sam deploy with that runtime, and
# make preflight. STACK=<name> for another stack than backend-orchestrator.
deploy:
	$(PYTHON) -m tools.deploy prepare --python $(LAMBDA_PYTHON) --arch $(LAMBDA_ARCH)
	$(MAKE) package validate $(DEPLOY_VENV)/.installed
	$(PYTHON) -m tools.deploy run --sam $(DEPLOY_VENV)/bin/sam --python $(LAMBDA_PYTHON) --arch $(LAMBDA_ARCH)
	$(MAKE) preflight

# The deployed function checks itself: permissions (DryRun), paths, settings, the backend. FUNCTION=<name> NOTIFY=true;
# the stack and region of the last make deploy. Credentials and a region are checked before anything is installed.
preflight:
	$(PYTHON) -m tools.deploy check
	$(MAKE) $(STAMP)
	$(BIN)/python -m tools.preflight

$(DEPLOY_VENV)/.installed: requirements-deploy.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-deploy.txt
	touch $@

bench: $(STAMP)
	PYTHONPATH=lambda:. $(BIN)/python -m tools.bench

# Re-pin after editing a *.in file: exact versions; the zip's dependencies also with hashes.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links lambda/requirements.in -o lambda/requirements.txt
	$(BIN)/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		requirements-dev.in -o requirements-dev.txt
	$(BIN)/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		requirements-deploy.in -o requirements-deploy.txt

clean:
	rm -rf dist build package .pytest_cache .mypy_cache .ruff_cache .hypothesis .aws-sam
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
