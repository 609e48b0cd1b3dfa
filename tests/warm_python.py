"""Run ``python SCRIPT ARGS`` as a child forked from a warm Python that imported torch and the project
once: a process of its own (exit code, signals, stdout and stderr, working directory and environment
as ``subprocess.run`` gives them) without paying torch's import, seconds per run, every time. The
fault suite runs dozens of CLI cases this way.

The warm server imports modules and runs no torch operation, so it holds no thread pool and forking
it is safe; each child starts from that same clean state, with the caller's environment (the
project reads the environment when called, not when imported).
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = r'''
import atexit, io, json, os, runpy, signal, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import main, torch                                   # imported once; no torch operation runs here
import seqmatchnet.cli.test, seqmatchnet.cli.train, seqmatchnet.evaluation.figures

def print_exc(script):
    """The traceback as ``python script`` prints it: from the script's own frame on."""
    kind, exc, tb = sys.exc_info()
    path = os.path.abspath(script)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != path:
        tb = tb.tb_next
    traceback.print_exception(kind, exc, tb)

def child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(0, closefd=False)
    unbuffered = bool(req["env"].get("PYTHONUNBUFFERED"))      # as Python sets up its standard streams
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                  write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), errors="backslashreplace",
                                  line_buffering=True, write_through=unbuffered)
    sys.argv = [req["script"], *req["args"]]
    sys.path[0] = os.path.dirname(os.path.abspath(req["script"]))
    code = 0
    try:
        runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:           # as Python does: the traceback, then die of SIGINT
        print_exc(req["script"])
        atexit._run_exitfuncs()
        sys.stdout.flush(); sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        print_exc(req["script"])
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code & 0xFF)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(70)
    deadline, status = time.monotonic() + req["timeout"], None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.02)
    sys.stdout.write(json.dumps(status) + "\n")
    sys.stdout.flush()
'''


class WarmPython:
    """A pool of warm servers (one per concurrent caller): ``run(script, args, cwd)`` returns a
    ``subprocess.CompletedProcess`` with text output, as ``subprocess.run(capture_output=True)``."""

    def __init__(self) -> None:
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._all: list[subprocess.Popen] = []

    def _server(self) -> subprocess.Popen:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            proc = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, bufsize=1)
            self._all.append(proc)
            return proc

    def run(self, script: Path | str, args: list[str] | tuple[str, ...], cwd: Path, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="warm_") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            req = {"script": str(script), "args": [str(a) for a in args], "cwd": str(cwd),
                   "env": dict(os.environ if env is None else env), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
            server = self._server()
            try:
                server.stdin.write(json.dumps(req) + "\n")
                server.stdin.flush()
                reply = server.stdout.readline()
            except BrokenPipeError:
                reply = ""
            if not reply:
                raise RuntimeError(f"the warm Python server died (exit {server.poll()})")
            self._idle.put(server)
            status = json.loads(reply)
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        argv = [sys.executable, str(script), *req["args"]]
        if status == "timeout":
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, status, stdout, stderr)

    def close(self) -> None:
        for proc in self._all:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=30)
