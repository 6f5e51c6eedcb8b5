"""A warm interpreter for the tests' subprocesses: Python with torch, transformers and TensorFlow
already imported, forked per command instead of started cold.

Starting Python and importing torch + transformers costs 5-7 CPU s; TensorFlow about as much.
Tests that run the library in a *new process* (a saved model loading elsewhere, a shell recipe,
``torchrun``, benchmark worker processes) pay that per process; on a two-core machine it was the
largest cost of ``make test`` left. Here one server per test run imports those third-party
frameworks once, then serves each command in a fork of itself:

* the server imports only third-party modules, never this repository's (``gd_core``,
  ``adapters``, ``gd_cli``, ``bench``, ``tests``): a command still imports the library itself,
  so "loads in a fresh process" keeps its meaning (no registration, cache or patch of the test
  process is there); the server checks this before it serves and every child checks it again;
* a command whose environment differs from the server's in a variable a framework reads at
  import (``HF_*``, ``TRANSFORMERS_*``, ``TORCH*``, ``OMP_*``, ``TF_*``, ``KERAS_*``, ...), or
  whose interpreter options are not handled here, runs in a real cold interpreter instead (the
  client ``exec``s Python): a difference means a slower run, never a different one;
* the client (``python`` in the run's folder, a stdlib-only script started with ``-ES``)
  passes its argv, environment, working folder and every open file descriptor (stdio and
  ``pass_fds``, so ``multiprocessing``'s spawn works through it); signals it receives go to the
  command's process group, and when the client dies (a test's timeout kills it) the command is
  killed; the client exits with the command's status (``-N`` for a signal, as ``subprocess``
  reports it);
* inside a command ``sys.executable`` is the client, so the processes it starts in turn
  (``torchrun``'s workers, ``bench/glue.py --jobs``, ``multiprocessing`` spawn) are warm too;
  Python's ``random`` and NumPy's global generator are reseeded as a fresh interpreter's would be.

Tests that check what a bare interpreter imports (tests/core/test_imports.py, the import-order
warning, the Keras backend's import isolation) keep ``sys.executable``: there the cold start is
the point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

# variables a preloaded framework reads when it is imported: a command whose value differs from
# the server's runs cold
SENSITIVE_PREFIXES = (
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS_",
    "TORCH",
    "PYTORCH",
    "CUDA",
    "OMP_",
    "MKL",
    "OPENBLAS",
    "KMP_",
    "TF_",
    "KERAS",
    "XLA",
    "USE_TORCH",
    "USE_TF",
    "ORT_",
    "LD_",
    "PYTHONHASHSEED",
    "PYTHONWARNINGS",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "PYTHONDONTWRITEBYTECODE",
    "XDG_CACHE_HOME",
    "HOME",
)
# ... except these, read when used, not at import: torchrun's settings for its workers, and
# what a test process's imports set while it runs (lightning sets the NVML check)
NOT_SENSITIVE_PREFIXES = ("TORCHELASTIC_", "TORCH_NCCL_", "PYTORCH_NVML_BASED_CUDA_CHECK")
PRELOAD = (
    "numpy",
    "torch",
    "torch.distributed",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "tokenizers",
    "safetensors",
    "tensorflow",
    "keras",
    "keras_hub",
)
# this repository's top-level packages: never imported by the server
OWN = ("gd_core", "adapters", "gd_cli", "bench", "tests", "_common", "glue", "fisher")


def _own_modules() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in OWN and m != __name__)


def _sensitive(env: dict[str, str]) -> dict[str, str]:
    return {
        k: v
        for k, v in env.items()
        if k.startswith(SENSITIVE_PREFIXES) and not k.startswith(NOT_SENSITIVE_PREFIXES)
    }


def _parse(argv: list[str]) -> dict | str:
    """The interpreter options this server runs: ``-u``, ``-B``, ``-W``, then ``-c``/``-m``/a
    script. Anything else is a reason to run cold (returned as a string)."""
    opts: dict = {"unbuffered": False, "nobytecode": False, "warnings": []}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-u":
            opts["unbuffered"] = True
        elif a == "-B":
            opts["nobytecode"] = True
        elif a.startswith("-W"):
            if a == "-W":
                i += 1
                if i >= len(argv):
                    return "-W without a value"
                opts["warnings"].append(argv[i])
            else:
                opts["warnings"].append(a[2:])
        elif a in ("-c", "-m"):
            if i + 1 >= len(argv):
                return f"{a} without a value"
            opts["kind"], opts["target"], opts["rest"] = a, argv[i + 1], argv[i + 2 :]
            return opts
        elif a.startswith("-"):
            return f"interpreter option {a!r}"
        else:
            opts["kind"], opts["target"], opts["rest"] = "script", a, argv[i + 1 :]
            return opts
        i += 1
    return "no command (an interactive interpreter)"


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError("the client went away")
        buf += chunk
    return buf


def _run_command(req: dict, opts: dict, fds: list[int], base: dict) -> int:
    """In the forked child: become the command's interpreter and run it; returns its status."""
    import atexit
    import fcntl
    import random
    import threading
    import types
    import warnings

    # the client's descriptors at their own numbers (first moved out of the way of every target)
    high = []
    for fd in fds:
        high.append(fcntl.fcntl(fd, fcntl.F_DUPFD, 1000))
        os.close(fd)
    for target, fd in zip(req["fds"], high, strict=True):
        os.dup2(fd, target, inheritable=True)
    for fd in high:
        os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for key, value in base["env_set_by_imports"].items():  # as the imports set them: by default
        os.environ.setdefault(key, value)
    sys.executable = req["exe"]  # the client, or (as_real) the interpreter itself
    sys._base_executable = req["exe"]  # type: ignore[attr-defined]
    if "multiprocessing.spawn" in sys.modules:  # it read sys.executable when imported
        sys.modules["multiprocessing.spawn"].set_executable(req["exe"])
    sys.dont_write_bytecode = opts["nobytecode"]
    if opts["unbuffered"] or os.environ.get("PYTHONUNBUFFERED"):
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)  # type: ignore[union-attr]
    if opts["warnings"]:  # -W: behind the frameworks' own filters, ahead of the defaults
        n_own = len(warnings.filters) - base["n_default_filters"]
        own_filters, defaults = warnings.filters[:n_own], warnings.filters[n_own:]
        warnings.filters[:] = defaults
        for option in opts["warnings"]:
            warnings._setoption(option)  # type: ignore[attr-defined]
        warnings.filters[:0] = own_filters
        warnings._filters_mutated()  # type: ignore[attr-defined]
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    # sys.path as a fresh interpreter builds it: the command's first entry, its PYTHONPATH, then
    # the interpreter's own entries
    kind, target = opts["kind"], opts["target"]
    if kind == "-c":
        first = ""
    elif kind == "-m":
        first = os.getcwd()
    else:
        first = os.path.dirname(os.path.realpath(target))
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *base["base_path"].split(os.pathsep)]
    own = _own_modules()
    if own:
        print(f"warm interpreter: {own} imported before the command", file=sys.stderr)
        return 70
    status = 0
    # a __main__ of the command's own (runpy runs -m modules in the current __main__'s dict:
    # never this server's)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    try:
        if kind == "-m":
            import runpy

            sys.argv = ["-m", *opts["rest"]]
            runpy._run_module_as_main(target, alter_argv=True)  # type: ignore[attr-defined]
        else:
            if kind == "-c":
                sys.argv = ["-c", *opts["rest"]]
                code = compile(target, "<string>", "exec")
            else:
                sys.argv = [target, *opts["rest"]]
                main.__file__ = target
                with open(target, "rb") as f:
                    code = compile(f.read(), target, "exec")
            exec(code, main.__dict__)
    except SystemExit as exc:
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code
        else:
            print(exc.code, file=sys.stderr)
            status = 1
    except BaseException:  # what the interpreter prints for an uncaught exception
        import traceback

        kind_, exc_, tb = sys.exc_info()
        traceback.print_exception(kind_, exc_, tb.tb_next if tb else tb)  # not this frame
        status = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # join non-daemon threads
        atexit._run_exitfuncs()
        # what the interpreter's finalisation would close: files the command left open in
        # its main module
        sys.modules["__main__"].__dict__.clear()
        import gc

        gc.collect()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return status & 0xFF


def _serve_one(conn: socket.socket, listener: socket.socket, base: dict) -> None:
    """In the fork that handles one client: check, fork the command, relay signals, report."""
    header, fds, _, _ = socket.recv_fds(conn, 8, 250)
    if len(header) < 8:
        header += _recv_exact(conn, 8 - len(header))
    req = json.loads(_recv_exact(conn, int.from_bytes(header, "big")))
    opts = _parse(req["argv"])
    mine, theirs = _sensitive(base["env"]), _sensitive(req["env"])
    by_imports = base["env_set_by_imports"]  # a command started by a warm one carries these
    differ = sorted(
        k
        for k in set(mine) | set(theirs)
        if mine.get(k) != theirs.get(k) and (k not in by_imports or theirs.get(k) != by_imports[k])
    )
    reason = opts if isinstance(opts, str) else ""
    if differ:
        reason = f"environment differs in {differ}"
    if reason or len(fds) != len(req["fds"]):
        reason = reason or "descriptors lost"
        print(f"warm server: runs cold ({reason}): {req['argv'][:3]}", file=sys.stderr, flush=True)
        _send(conn, {"fallback": reason})
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            listener.close()
            conn.close()
            os.setpgid(0, 0)
            status = _run_command(req, opts, fds, base)  # type: ignore[arg-type]
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    _send(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    import select

    poller = select.poll()
    poller.register(conn, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if pidfd in ready:
            _, wstatus = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(wstatus)
            _send(conn, {"status": code})
            return
        data = conn.recv(16)
        sig = data[0] if data else signal.SIGKILL
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        if not data:  # the client is gone: nobody waits for the result
            poller.unregister(conn)


def serve(sock_path: str, watch_pid: int) -> None:
    """Import the frameworks, then serve clients on ``sock_path`` until ``watch_pid`` (the test
    run) is gone."""
    import importlib
    import warnings

    n_default_filters = len(warnings.filters)
    env_before = dict(os.environ)
    base_path = [p for p in sys.path if p and os.path.abspath(p) != os.path.dirname(__file__)]
    for env_path in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if env_path in base_path:
            base_path.remove(env_path)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    own = _own_modules()
    if own:
        raise SystemExit(f"warm server: this repository's modules were imported: {own}")
    import gc

    # what the imports made lives as long as a cold interpreter's imports would: out of the
    # collector's sight, so a fork's collections neither walk nor copy those pages
    gc.collect()
    gc.freeze()
    base = {
        "env": env_before,
        # what importing the frameworks set in the environment (torch sets KMP_* variables):
        # a cold interpreter of the command would set it too
        "env_set_by_imports": {k: v for k, v in os.environ.items() if env_before.get(k) != v},
        "base_path": os.pathsep.join(base_path),
        "n_default_filters": n_default_filters,
    }
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped without a wait
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{sock_path}.{os.getpid()}"
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, sock_path)  # clients connect only once everything is imported
    listener.settimeout(1.0)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            try:
                os.kill(watch_pid, 0)
            except ProcessLookupError:
                break
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            try:
                listener.settimeout(None)
                _serve_one(conn, listener, base)  # type: ignore[arg-type]
            finally:
                os._exit(0)
        conn.close()
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass


CLIENT = r"""#!{python} -ES
# generated by tests/_warm.py: run this command in a fork of the warm server, or cold
import json, os, signal, socket, sys
SOCK, REAL, AS_REAL = {sock!r}, {python!r}, {as_real!r}
def cold():
    os.execv(REAL, [REAL] + sys.argv[1:])
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
except OSError:
    cold()
fds = []
for name in os.listdir("/proc/self/fd"):
    fd = int(name)
    if fd != s.fileno():
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
exe = REAL if AS_REAL else os.path.abspath(sys.argv[0])
body = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                   "fds": fds, "exe": exe}}).encode()
socket.send_fds(s, [len(body).to_bytes(8, "big")], fds)
s.sendall(body)
reader = s.makefile("rb")
first = json.loads(reader.readline() or b"{{}}")
if "fallback" in first or "pid" not in first:
    s.close()
    cold()
def relay(sig, frame):
    try:
        s.send(bytes([sig]))
    except OSError:
        pass
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(sig, relay)
line = reader.readline()
if not line:
    sys.stderr.write("warm interpreter: the server went away before the command ended\n")
    os._exit(1)
code = json.loads(line)["status"]
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
os._exit(code & 0xFF)
"""


def write_client(path: str, sock_path: str, python: str, as_real: bool = False) -> str:
    """Write the client script at ``path`` (atomically, executable) and return ``path``. With
    ``as_real``, the commands it runs see ``python`` as ``sys.executable`` (the pytest workers
    themselves: their tests start cold interpreters with it where cold is the point)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(CLIENT.format(python=python, sock=sock_path, as_real=as_real))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "serve":
        raise SystemExit("usage: python tests/_warm.py serve SOCKET WATCH_PID")
    serve(sys.argv[2], int(sys.argv[3]))
