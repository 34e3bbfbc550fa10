"""A warm process that runs the DVC stages: each stage is forked from it instead of starting a new interpreter.

Why: ``dvc repro`` starts one process per stage (about 220 in the default ``params.yaml``), and each one imports
torch, torchvision (which imports ``torch._dynamo``), timm and the stage's dgh modules before doing any work:
12.6 CPU-seconds per stage on the project's 2-core CPU (``python -c "import dgh.pipeline.evaluate"``: user 11.6 s +
sys 1.1 s; ``import torch`` alone 5.2 s), about 45 of the default run's minutes. A forked child of a process that
has already imported them starts in milliseconds and runs the same code.

How (Linux without an NVIDIA device, or ``DGH_FORKSERVER=1``; elsewhere, and with ``DGH_FORKSERVER=0``, every stage
runs in its own process as before, see :func:`enabled`):

- a stage module calls :func:`run_in_server` under ``if __name__ == "__main__"`` before its own imports. It connects
  to the server's Unix socket (starting the server if none is listening), sends the module name, its arguments,
  the working directory and the environment, and passes its stdin/stdout/stderr file descriptors (``SCM_RIGHTS``);
- the server forks a handler per request; the handler forks the stage process, which takes over those descriptors,
  the directory and the environment and runs the module as ``__main__`` (:func:`runpy.run_module`). Every stage
  starts from the server's pristine state, never from another stage's;
- the client relays SIGINT/SIGTERM to the stage and exits with its exit status (128 + N for a signal N); if the
  client goes away, the stage is terminated.

A server serves one fingerprint (:func:`fingerprint`): this Python, the dgh source files (paths, sizes and mtimes),
the installed packages (the entries of every ``sys.path`` folder and the mtimes of its install records) and the
environment. Any change, e.g. an edited ``dgh`` module or ``pip install``, gives a new socket name and so a fresh
server; a stale one exits after ``IDLE_S`` seconds without requests. Server log: ``<socket>.log``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

ENV_SWITCH = "DGH_FORKSERVER"  # "0" runs every stage in its own process
ENV_CHILD = "DGH_FORKSERVER_CHILD"  # set in a forked stage: run_in_server() then runs the stage in place
ENV_PRELOAD = "DGH_FORKSERVER_PRELOAD"  # comma-separated modules to import in the server (tests)
ENV_IDLE = "DGH_FORKSERVER_IDLE_S"  # idle seconds before the server exits (default IDLE_S)
IDLE_S = 120.0  # a server with no stage running and no request for this long exits
START_TIMEOUT_S = 300.0  # the preload takes ~30 s on a loaded 2-core CPU
PRELOAD = (
    "dgh.pipeline.inputs", "dgh.pipeline.generate", "dgh.pipeline.set_stats", "dgh.pipeline.quantize",
    "dgh.pipeline.quant_stats", "dgh.pipeline.stats", "dgh.pipeline.export", "dgh.pipeline.evaluate",
    "dgh.pipeline.report", "timm", "ultralytics.nn.tasks",
)
# environment variables that differ between stages of one run without changing what an import does
_ENV_VOLATILE = ("PWD", "OLDPWD", "SHLVL", "_", ENV_CHILD)
_HEADER = struct.Struct("!Q")


class ServerUnavailable(RuntimeError):
    """No server could be reached or started; the caller runs the stage itself."""


_INSTALL_RECORDS = (".dist-info", ".egg-info", ".egg-link", ".pth")


def _folder_contents(folder: Path) -> str:
    """A short hash of what an import path entry holds: for a folder, its entry names (``__pycache__`` left out:
    Python creates it on the first import, and that must not make the next stage start a new server) and the mtimes
    of its install records (``*.dist-info``, ``*.egg-info``, ``*.egg-link``, ``*.pth``: pip rewrites them on every
    install, a reinstall of the same version included); for a file (a zip archive), its size and mtime.

    Raises:
        OSError: ``folder`` cannot be read.
    """
    if not folder.is_dir():
        st = folder.stat()
        return f"file {st.st_size} {st.st_mtime_ns}"
    items = []
    for name in sorted(os.listdir(folder)):
        if name == "__pycache__":
            continue
        items.append(f"{name} {(folder / name).stat().st_mtime_ns}" if name.endswith(_INSTALL_RECORDS) else name)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def fingerprint_inputs(env: dict[str, str] | None = None) -> list[str]:
    """What :func:`fingerprint` hashes, one line per item (written next to a new server's log as ``.inputs``).

    Args:
        env: the environment (default ``os.environ``); variables named in ``_ENV_VOLATILE`` or starting with
            ``DVC_`` are left out.
    """
    env = dict(os.environ if env is None else env)
    lines = [f"python {sys.executable} {sys.version.split()[0]}"]
    pkg = Path(__file__).resolve().parents[1]
    for path in sorted(pkg.rglob("*.py")):
        st = path.stat()
        lines.append(f"file {path} {st.st_size} {st.st_mtime_ns}")
    # installed packages: what each sys.path folder holds (:func:`_folder_contents`). The project folder (the
    # working directory, dgh's parent) is left out: every stage writes there, and its dgh files are hashed above.
    project = {Path.cwd().resolve(), pkg.parent}
    for entry in sys.path:
        try:
            folder = Path(entry or ".").resolve()
            if folder not in project:
                lines.append(f"path {entry} {_folder_contents(folder)}")
        except OSError:
            continue
    for key in sorted(env):
        if key not in _ENV_VOLATILE and not key.startswith("DVC_"):
            lines.append(f"env {key}={env[key]}")
    return lines


def fingerprint(env: dict[str, str] | None = None) -> str:
    """A short hash of everything a server's imports depend on (module docstring, :func:`fingerprint_inputs`)."""
    return hashlib.sha256("\n".join(fingerprint_inputs(env)).encode()).hexdigest()[:16]


def socket_path(env: dict[str, str] | None = None) -> Path:
    """``<runtime dir>/dgh-forkserver-<uid>/<fingerprint>.sock`` (``XDG_RUNTIME_DIR``, else the temp folder)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp")
    folder = base / f"dgh-forkserver-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{fingerprint(env)}.sock"


def enabled() -> bool:
    """True where stages may run in the server: Linux, ``socket.send_fds`` available, not already inside a forked
    stage, and ``DGH_FORKSERVER`` is 1, or unset on a machine without an NVIDIA device node. A CUDA driver
    initialized in the server before the fork (any ``torch.cuda.is_available()`` during the preload, e.g. in a
    library's import) cannot be used by the forked stages, and this has not been tested on a GPU machine, so GPU
    machines keep one process per stage unless ``DGH_FORKSERVER=1`` asks for the server."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch == "0" or os.environ.get(ENV_CHILD) or sys.platform != "linux" or not hasattr(socket, "send_fds"):
        return False
    return switch == "1" or not Path("/dev/nvidiactl").exists()


# ------------------------------------------------------------------------------------------------ client
def run_in_server(module: str, argv: list[str] | None = None) -> None:
    """Run ``python -m <module> <argv>`` in the warm server and exit with its status; return without doing
    anything when the server is disabled or cannot be reached (the caller then runs the stage itself).

    Raises:
        SystemExit: always, when the stage ran in the server (its exit status).
    """
    if not enabled():
        return
    try:
        code = request(module, sys.argv[1:] if argv is None else argv)
    except ServerUnavailable as exc:
        print(f"dgh fork server unavailable ({exc}); running the stage in this process", file=sys.stderr)
        return
    raise SystemExit(code)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _start_server(path: Path) -> subprocess.Popen:
    log = open(f"{path}.log", "ab")  # noqa: SIM115 - handed to the server process
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "dgh.pipeline.forkserver", str(path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=dict(os.environ),
        )
    finally:
        log.close()


def _server_socket(path: Path) -> socket.socket:
    """A connection to the server of ``path``, starting one when none answers.

    Raises:
        ServerUnavailable: the server did not come up within ``START_TIMEOUT_S`` or exited.
    """
    sock = _connect(path)
    if sock is not None:
        return sock
    Path(f"{path}.inputs").write_text("\n".join(fingerprint_inputs()) + "\n")
    proc = _start_server(path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        sock = _connect(path)
        if sock is not None:
            return sock
        if proc.poll() is not None:  # lost a start race (another server bound the path) or failed
            sock = _connect(path)
            if sock is not None:
                return sock
            raise ServerUnavailable(f"the server exited with status {proc.returncode}; see {path}.log")
        time.sleep(0.1)
    raise ServerUnavailable(f"no server answered within {START_TIMEOUT_S:.0f} s; see {path}.log")


def request(module: str, argv: list[str]) -> int:
    """Send one stage to the server and wait for it; returns its exit status.

    Raises:
        ServerUnavailable: no server, or it went away before starting the stage.
    """
    path = socket_path()
    sock = _server_socket(path)
    payload = json.dumps({"module": module, "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with sock:
        try:
            socket.send_fds(sock, [_HEADER.pack(len(payload)) + payload], [0, 1, 2])
        except OSError as exc:
            raise ServerUnavailable(f"cannot send to {path}: {exc}") from None
        reader = sock.makefile("r")
        first = reader.readline().split()
        if len(first) != 2 or first[0] != "pid":
            raise ServerUnavailable(f"the server at {path} did not start the stage")
        pid = int(first[1])

        def relay(signum: int, _frame: object) -> None:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

        old = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            last = reader.readline().split()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if len(last) != 2 or last[0] != "exit":
        print(f"error: the dgh fork server lost stage process {pid} ({module})", file=sys.stderr)
        return 1
    return int(last[1])


# ------------------------------------------------------------------------------------------------ server
def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < _HEADER.size:
        raise ValueError("short request")
    (size,) = _HEADER.unpack(data[: _HEADER.size])
    body = bytearray(data[_HEADER.size:])
    while len(body) < size:
        chunk = conn.recv(min(1 << 20, size - len(body)))
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    return json.loads(body.decode()), list(fds)


def _run_stage(req: dict, fds: list[int], threads: int | None) -> None:
    """In the stage process: take over the client's stdio, directory and environment, restore torch's default
    intra-op thread count ``threads`` (None: torch is not loaded), run the module, exit."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    os.environ[ENV_CHILD] = "1"
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
    sys.argv = [req["module"], *req["argv"]]
    # fresh seeds as in a new interpreter (torch, numpy and random seed themselves from the OS at start): without
    # this every stage would inherit the server's generator states and draw the same "random" numbers
    random.seed()
    if threads is not None:
        sys.modules["torch"].set_num_threads(threads)
    for name, reseed in (("torch", lambda m: m.seed()), ("numpy", lambda m: m.random.seed())):
        if name in sys.modules:
            reseed(sys.modules[name])
    # the module was imported by the preload: running it again as __main__ is what `python -m` does too
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
    code = 0
    try:
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported like the interpreter would, then a non-zero status
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    os._exit(code)


def _handle(conn: socket.socket, threads: int | None) -> None:
    """In the per-request handler: fork the stage (:func:`_run_stage` with ``threads``), report its pid and exit
    status, end it if the client leaves."""
    try:
        req, fds = _recv_request(conn)
    except (OSError, ValueError) as exc:
        print(f"bad request: {exc}", file=sys.stderr)
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_stage(req, fds, threads)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {pid}\n".encode())
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            try:
                conn.sendall(f"exit {code}\n".encode())
            except OSError:
                pass
            os._exit(0)
        readable, _, _ = select.select([conn], [], [], 0.2)
        if readable and not conn.recv(1):  # the client is gone: end its stage
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    os._exit(0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os._exit(0)


def _single_threaded_torch() -> int | None:
    """Import torch (if installed), set it to one intra-op thread and return its default thread count.

    The server must never run an OpenMP parallel region with 2+ threads: GNU libgomp's thread pool does not survive
    ``fork()``, and a forked stage then hangs in its first parallel region with 2+ threads (measured with torch
    2.14.1: a 2-thread conv2d before the fork and another after it hangs the child; with 1 thread in the parent,
    the child's 2-thread conv2d ends). With one thread no pool is ever created, and each stage gets the default
    back (:func:`_run_stage`) before its own ``threads`` setting applies.
    """
    try:
        import torch
    except ImportError:
        return None
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    return default


def serve(path: Path, preload: tuple[str, ...] = PRELOAD, idle_s: float = IDLE_S) -> None:
    """Import ``preload`` (a missing optional module is skipped), listen on ``path`` and fork a handler per
    request until ``idle_s`` seconds pass with no request and no stage running."""
    import importlib

    # torch.cuda.is_available() through NVML: it leaves the CUDA driver uninitialized, so forked stages can use it
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    threads = _single_threaded_torch()
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"preload: {name} skipped ({exc})", file=sys.stderr)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        if path.exists() and _connect(path) is None:
            path.unlink()  # a dead server's socket
        server.bind(str(path))
    except OSError as exc:
        print(f"cannot listen on {path}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        os.umask(old_umask)
    server.listen(16)
    server.settimeout(min(5.0, idle_s))
    print(f"{time.strftime('%H:%M:%S')} serving {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    handlers: set[int] = set()  # running per-request handlers (one per stage)
    last_busy = time.monotonic()
    try:
        while True:
            for pid in list(handlers):  # reap finished handlers; a running stage keeps the server alive
                if os.waitpid(pid, os.WNOHANG)[0]:
                    handlers.discard(pid)
            if handlers:
                last_busy = time.monotonic()
            elif time.monotonic() - last_busy > idle_s:
                break
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # nothing of the server's output may reach a stage's stdio
            pid = os.fork()
            if pid == 0:
                server.close()
                _handle(conn, threads)
            handlers.add(pid)
            last_busy = time.monotonic()
            conn.close()
    finally:
        try:
            if path.exists():
                path.unlink()
        except OSError:
            pass
        server.close()


def main() -> None:
    """``python -m dgh.pipeline.forkserver SOCKET``: the server process (started by :func:`request`)."""
    preload = os.environ.get(ENV_PRELOAD)
    names = tuple(n for n in preload.split(",") if n) if preload is not None else PRELOAD
    serve(Path(sys.argv[1]), names, float(os.environ.get(ENV_IDLE, IDLE_S)))


if __name__ == "__main__":
    main()
