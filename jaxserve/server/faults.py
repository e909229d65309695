"""Fault injection for tests: make an engine step raise or hang when a marked request is in it.

JAXSERVE_FAULT_INJECT="KIND:MARKER[,KIND:MARKER...]" marks every request whose prompt text or
request id contains MARKER; a step whose batch holds a marked request then
  raise   raises RuntimeError (an ordinary bug: the step's requests fail, the engine keeps serving),
  device  raises an error flagged as a device error (the engine is dead, the server exits),
  hang    never returns (the --step-timeout watchdog must declare the engine dead).
Unset (the default), nothing is installed: the hot path is untouched.
"""
from __future__ import annotations

import logging
import os
import threading

ENV = "JAXSERVE_FAULT_INJECT"
KINDS = ("raise", "device", "hang")

logger = logging.getLogger("jaxserve.server")


class InjectedFault(RuntimeError):
    """Raised by a step holding a request marked `raise:`."""


class InjectedDeviceError(RuntimeError):
    """Raised by a step holding a request marked `device:`; async_engine treats it as broken."""

    device_error = True


def parse(spec: str) -> list[tuple[str, str]]:
    """'raise:POISON,hang:SLEEPY' -> [("raise", "POISON"), ("hang", "SLEEPY")]."""
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, marker = part.partition(":")
        if not sep or kind not in KINDS or not marker:
            raise ValueError(f"{ENV} entry {part!r} must be KIND:MARKER with KIND in {KINDS}")
        rules.append((kind, marker))
    return rules


def install_from_env(engine) -> None:
    spec = os.environ.get(ENV)
    if spec:
        install(engine, spec)


def install(engine, spec: str):
    """Wrap engine.add_request (to mark requests) and engine.runner.dispatch (to fault); returns
    a function that removes both wrappers."""
    rules = parse(spec)
    marked: dict[str, str] = {}  # request id -> kind
    add_request, dispatch = engine.add_request, engine.runner.dispatch
    assert "add_request" not in vars(engine), "fault injection is installed already"

    def marking_add_request(request_id, prompt, *args, **kwargs):
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        for kind, marker in rules:
            if marker in request_id or (isinstance(text, str) and marker in text):
                marked[request_id] = kind
        return add_request(request_id, prompt, *args, **kwargs)

    def faulty_dispatch(batch, *args, **kwargs):
        for seq in batch.seqs:
            kind = marked.get(seq.request_id)
            if kind == "raise":
                raise InjectedFault(f"injected fault for request {seq.request_id}")
            if kind == "device":
                raise InjectedDeviceError(f"injected device error for request {seq.request_id}")
            if kind == "hang":
                logger.warning("injected hang for request %s", seq.request_id)
                threading.Event().wait()
        return dispatch(batch, *args, **kwargs)

    engine.add_request, engine.runner.dispatch = marking_add_request, faulty_dispatch
    logger.warning("%s=%r: fault injection is ON (a test mode)", ENV, spec)

    def uninstall() -> None:  # drop the instance attributes: the class's methods show again
        del engine.add_request, engine.runner.dispatch

    return uninstall
