"""The warm stage process (:mod:`dgh.pipeline.forkserver`): a stage forked from it gets the caller's arguments,
directory, environment, stdio and exit status; one server serves one fingerprint; switched off, nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dgh.pipeline import forkserver

REPO = Path(__file__).resolve().parents[1]
STAGE = """
import os, sys
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("marker", os.environ.get("FS_MARKER"))
print("pgid", os.getpgid(0))
print("to stderr", file=sys.stderr)
if "boom" in sys.argv:
    raise RuntimeError("stage failed")
sys.exit(int(os.environ.get("FS_EXIT", "0")))
"""
CLIENT = textwrap.dedent("""
    import sys
    from dgh.pipeline.forkserver import run_in_server
    run_in_server("fs_stage_mod", sys.argv[1:])
    print("ran in the client")
""")

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not hasattr(__import__("socket"), "send_fds"),
                                reason="Linux fork server")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fs_stage_mod.py").write_text(STAGE)
    run_dir = tmp_path / "rt"
    run_dir.mkdir()
    e = {k: v for k, v in os.environ.items() if not k.startswith("DGH_FORKSERVER")}
    e.update(PYTHONPATH=f"{mods}{os.pathsep}{REPO}", XDG_RUNTIME_DIR=str(run_dir), FS_MARKER="m1", DGH_FORKSERVER="1",
             DGH_FORKSERVER_PRELOAD="json", DGH_FORKSERVER_IDLE_S="20")
    return e


def _client(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _field(out: str, name: str) -> str:
    return next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(name + " "))


def test_stage_runs_in_the_server_with_the_callers_context(env: dict[str, str], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    first = _client(dict(env, FS_EXIT="3"), work, "a", "b c")
    assert first.returncode == 3, first.stderr
    assert _field(first.stdout, "argv") == "['a', 'b c']"
    assert Path(_field(first.stdout, "cwd")) == work.resolve()
    assert _field(first.stdout, "marker") == "m1"
    assert "to stderr" in first.stderr and "ran in the client" not in first.stdout
    server = int(_field(first.stdout, "pgid"))
    assert server != os.getpgid(0)  # a separate session: the server's
    # FS_EXIT changes the environment, hence the fingerprint: run the same environment twice to see reuse
    again = _client(dict(env, FS_EXIT="3"), work, "x")
    assert again.returncode == 3 and int(_field(again.stdout, "pgid")) == server
    other = _client(dict(env, FS_MARKER="m2"), work)
    assert other.returncode == 0 and _field(other.stdout, "marker") == "m2"
    assert int(_field(other.stdout, "pgid")) != server  # another environment, another server


def test_a_failing_stage_reports_its_traceback_and_status_1(env: dict[str, str], tmp_path: Path) -> None:
    res = _client(env, tmp_path, "boom")
    assert res.returncode == 1
    assert "RuntimeError: stage failed" in res.stderr


def test_switched_off_the_caller_runs_the_stage_itself(env: dict[str, str], tmp_path: Path) -> None:
    res = _client(dict(env, DGH_FORKSERVER="0"), tmp_path)
    assert res.returncode == 0 and "ran in the client" in res.stdout
    assert not list((tmp_path / "rt").rglob("*.sock"))


def test_fingerprint_follows_the_environment_but_not_volatile_variables() -> None:
    base = {"A": "1", "PWD": "/x", "DVC_ROOT": "/r"}
    assert forkserver.fingerprint(base) == forkserver.fingerprint(dict(base, PWD="/y", DVC_ROOT="/s", SHLVL="3"))
    assert forkserver.fingerprint(base) != forkserver.fingerprint(dict(base, A="2"))


def test_stages_do_not_share_the_servers_generator_states(env: dict[str, str], tmp_path: Path) -> None:
    """Fresh interpreters seed torch, numpy and random from the OS; forked stages must not all inherit the
    server's states (they would draw the same numbers)."""
    mods = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    (mods / "fs_draw_mod.py").write_text(
        "import random, numpy, torch\nprint('draw', float(torch.rand(1)), numpy.random.rand(), random.random())\n")
    client = CLIENT.replace("fs_stage_mod", "fs_draw_mod")
    run_env = dict(env, DGH_FORKSERVER_PRELOAD="torch,numpy")
    draws = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", client], env=run_env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        draws.append(_field(res.stdout, "draw").split())
    assert all(a != b for a, b in zip(*draws)), draws


def test_enabled_follows_the_switch_and_stays_off_inside_a_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(forkserver.ENV_CHILD, raising=False)
    monkeypatch.setenv(forkserver.ENV_SWITCH, "1")
    assert forkserver.enabled()
    monkeypatch.setenv(forkserver.ENV_SWITCH, "0")
    assert not forkserver.enabled()
    monkeypatch.setenv(forkserver.ENV_SWITCH, "1")
    monkeypatch.setenv(forkserver.ENV_CHILD, "1")
    assert not forkserver.enabled()
    monkeypatch.delenv(forkserver.ENV_CHILD)
    monkeypatch.delenv(forkserver.ENV_SWITCH)  # unset: on, unless an NVIDIA device node exists
    assert forkserver.enabled() == (not Path("/dev/nvidiactl").exists())


def test_a_stage_longer_than_the_idle_time_keeps_its_server(env: dict[str, str], tmp_path: Path) -> None:
    """Idle means no request and no stage running: the stage after a long one reuses the server."""
    mods = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    (mods / "fs_slow_mod.py").write_text("import os, time\ntime.sleep(4)\nprint('pgid', os.getpgid(0))\n")
    run_env = dict(env, DGH_FORKSERVER_IDLE_S="1")
    pgids = []
    for mod in ("fs_slow_mod", "fs_stage_mod"):
        res = subprocess.run([sys.executable, "-c", CLIENT.replace("fs_stage_mod", mod)], env=run_env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        pgids.append(_field(res.stdout, "pgid"))
    assert pgids[0] == pgids[1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for a 2-thread OpenMP region")
def test_a_stage_can_use_two_threads_after_a_preload_that_ran_torch_ops(env: dict[str, str], tmp_path: Path) -> None:
    """GNU libgomp's thread pool does not survive fork(): had the server run a 2-thread region (here: a convolution
    in a preloaded module), a stage's own 2-thread region would hang. The stage also starts at torch's default
    thread count, that of a fresh interpreter in the same environment."""
    mods = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    conv = "torch.nn.functional.conv2d(torch.ones(8, 16, 64, 64), torch.ones(16, 16, 3, 3))"
    (mods / "fs_warm_mod.py").write_text(f"import torch\n{conv}\n")
    (mods / "fs_conv_mod.py").write_text(
        f"import torch\nprint('default', torch.get_num_threads())\ntorch.set_num_threads(2)\n{conv}\nprint('done')\n")
    run_env = dict(env, DGH_FORKSERVER_PRELOAD="fs_warm_mod")
    res = subprocess.run([sys.executable, "-c", CLIENT.replace("fs_stage_mod", "fs_conv_mod")], env=run_env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=run_env,
                           capture_output=True, text=True, timeout=90)
    assert int(_field(res.stdout, "default")) == int(fresh.stdout)


def test_fingerprint_ignores_pycache_but_follows_installs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first import writes ``__pycache__`` into an import folder: the next stage must reuse the server. A pip
    install adds or rewrites a ``*.dist-info`` folder: the next stage must get a fresh one."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setattr(sys, "path", [str(site)])
    env = {"A": "1"}
    before = forkserver.fingerprint(env)
    (site / "__pycache__").mkdir()
    assert forkserver.fingerprint(env) == before
    record = site / "pkg-1.0.dist-info"
    record.mkdir()
    installed = forkserver.fingerprint(env)
    assert installed != before
    os.utime(record, ns=(1, 1))  # the same version reinstalled: a new mtime on its record
    assert forkserver.fingerprint(env) != installed
