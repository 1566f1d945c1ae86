"""The Lambda handler the template names: backend_orchestrator.lambda_handler. The code is in orchestrator/, beside
this file (orchestrator/__init__.py says what is where); INIT builds the AWS clients the configuration will use."""

import os
from typing import Any

from orchestrator.aws import warm_clients
from orchestrator.entry import handle


def lambda_handler(event: object, context: object) -> dict[str, Any]:
    """One invocation: see orchestrator.entry.handle()."""
    return handle(event, context, os.environ)


warm_clients(os.environ)  # INIT, at full speed: no invocation of a well configured function builds a client
