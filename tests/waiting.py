"""Polling for what a background process will do: the one wait the launcher, liveness and Slurm tests share."""

import time


def wait_for(predicate, timeout: float = 240, what="condition") -> None:
    """Until `predicate()` is true; `what` (text, or a callable giving it at the time out) says what failed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
