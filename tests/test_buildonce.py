import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from labkit.buildonce import MARKER, build_once, is_complete

ROOT = Path(__file__).resolve().parent.parent

# Each process appends its pid to `log` when it builds; the build is slow enough that all of them
# are waiting on the lock while the first one builds.
RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from labkit.buildonce import build_once
    entry, log, go, delay = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    def build(tmp):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        (tmp / "part1").write_text("a")
        time.sleep(delay)
        (tmp / "part2").write_text("b")
    built = build_once(entry, build)
    print("built" if built else "waited", (entry / "part1").read_text() + (entry / "part2").read_text())
""")


def racers(tmp_path, n: int, delay: float) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "entry"), str(tmp_path / "log"),
                              str(tmp_path / "go"), str(delay)], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(n)]


def test_processes_started_together_build_once_and_all_read_the_whole_entry(tmp_path):
    procs = racers(tmp_path, 4, delay=0.5)
    time.sleep(0.3)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o[0] for o in outs) == ["built", "waited", "waited", "waited"]
    assert all(o[1] == "ab" for o in outs)
    assert len((tmp_path / "log").read_text().split()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


def test_entry_without_its_marker_is_rebuilt(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "tokenizer.json").write_text("{}")  # a poisoned entry: some files, never finished
    assert not is_complete(entry)
    assert build_once(entry, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in entry.iterdir()) == sorted([MARKER, "config.json"])
    assert not build_once(entry, lambda tmp: pytest.fail("a complete entry is never rebuilt"))


def test_failed_build_leaves_nothing_and_the_next_caller_builds(tmp_path):
    entry = tmp_path / "entry"

    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        build_once(entry, boom)
    assert not entry.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert build_once(entry, lambda tmp: (tmp / "ok").write_text("1")) and is_complete(entry)


def test_builder_killed_mid_build_does_not_block_the_others(tmp_path):
    (tmp_path / "go").touch()
    (victim,) = racers(tmp_path, 1, delay=60)
    deadline = time.monotonic() + 60
    while not (tmp_path / "log").exists():  # the victim holds the lock and is building
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert build_once(tmp_path / "entry", lambda tmp: (tmp / "part1").write_text("z"))
    assert (tmp_path / "entry" / "part1").read_text() == "z"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the victim's half build is gone
