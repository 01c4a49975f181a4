"""Failpoints: named places in the lifecycle where a chaos test holds a process or kills it.

``HSCR_FAILPOINTS="finalize.before_manifest=sleep(60),chunk.after_compute=kill"`` makes a worker sleep when it
reaches ``finalize.before_manifest`` and SIGKILL itself at ``chunk.after_compute``. With the variable unset (as
in production) a failpoint is a dictionary lookup. The chaos suite (tests/service/test_failures.py) uses them to
land a fault at a known point by construction instead of by timing.

Points: ``chunk.after_compute`` (a chunk computed, its shards not yet written), ``finalize.before_manifest``
(status ``finalizing``, the manifest not yet written).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time

ENV = "HSCR_FAILPOINTS"
_ACTION = re.compile(r"sleep\(([0-9.]+)\)|kill")

log = logging.getLogger(__name__)


def _actions() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    actions = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = entry.partition("=")
        if not _ACTION.fullmatch(action):
            raise ValueError(f"{ENV}: {entry!r} is not <point>=sleep(<seconds>) or <point>=kill")
        actions[name] = action
    return actions


def failpoint(name: str) -> None:
    """Do what ``HSCR_FAILPOINTS`` says for ``name``: nothing (the default), sleep, or SIGKILL this process."""
    action = _actions().get(name) if ENV in os.environ else None
    if action is None:
        return
    log.warning("failpoint %s reached: %s", name, action)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(_ACTION.fullmatch(action).group(1)))
