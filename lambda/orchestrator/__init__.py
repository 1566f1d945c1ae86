"""The Backend Orchestrator: wake the PyElli backend's EC2 instance on demand and stop it once it has been idle.

The handler the template names is `backend_orchestrator.lambda_handler`, in the file beside this folder. The code
reads bottom up, each module importing only the ones below it (tests/test_layers.py checks it):

    words       the shared vocabulary: actions, decisions, signals, tag names, states
    values      reading and showing plain values: strict JSON, numbers, times
    logs        one JSON log line and one EMF metrics line per invocation
    errors      each error class with its HTTP status and its one code
    settings    every environment variable, read and checked once (Config, AuthToken, Settings)
    budget      the clock, the deadline, what each step leaves for the next, each action's worst and least
    events      what an invocation asks: a Function URL, API Gateway, EventBridge or direct event
    targets     what a Describe says of a fleet and its instances, and the fleet protocol the actions use
    activity    the activity contract, read from the backend's answer
    holds       an operator's hold, read from the instance's tags or asked for
    rules       the pure decision: judge() holds check_idle's rules on one screen
    aws         every AWS call within the deadline, errors told apart by their code; CloudWatch and SNS
    backend     one HTTP exchange with the backend, bounded in time and bytes: activity, drain, health
    fleet       the EC2 edge: one instance, a fleet of one behind the targets protocol
    group       the Auto Scaling edge: a group as a fleet, scaled 0 to N, its working instances protected
    actions     start, status, stop, hold, release: each takes a Run and returns a Done
    idle        check_idle: describe, judge each instance, carry out
    present     a Done becomes the answer: body, status, metrics, log level, notices
    preflight   what is wrong with the deployment, before the first idle night
    entry       classify, authorise, configure, dispatch (one match), render, log
"""
