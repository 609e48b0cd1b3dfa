"""The warm runner the fault suite relies on gives what ``subprocess.run`` gives: exit codes, signals,
output, working directory and environment (each script run both ways)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from warm_python import WarmPython

SCRIPTS = {
    "exit 3": "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
    "exit message": "import sys; sys.exit('error: something went wrong')",
    "traceback": "print('before'); raise ValueError('boom')",
    "killed": "import os, signal, sys; print('lost in the buffer'); os.kill(os.getpid(), signal.SIGKILL)",
    "interrupt": "raise KeyboardInterrupt",
    "cwd, argv and env": "import os, sys; print(os.getcwd(), sys.argv[1:], os.environ.get('WARM_TEST'))",
    "atexit and torch": "import atexit, torch; atexit.register(lambda: print('bye')); print(torch.ones(3).sum())",
    "stdin is empty": "import sys; print(repr(sys.stdin.read()))",
}


@pytest.fixture(scope="module")
def warm():
    runner = WarmPython()
    yield runner
    runner.close()


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_warm_run_equals_subprocess_run(warm, tmp_path, name):
    script = tmp_path / "script.py"
    script.write_text(SCRIPTS[name] + "\n")
    env = {**os.environ, "WARM_TEST": "yes"}
    want = subprocess.run([sys.executable, str(script), "a", "b c"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)
    got = warm.run(script, ["a", "b c"], tmp_path, env)
    assert got.returncode == want.returncode, (got, want)
    assert got.stdout == want.stdout
    assert got.stderr == want.stderr


def test_timeout_kills_the_child(warm, tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time; print('started', flush=True); time.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired) as err:
        warm.run(script, [], tmp_path, timeout=1)
    assert "started" in err.value.stdout
    assert warm.run(tmp_path / "none.py", [], tmp_path).returncode != 0     # the server still serves
