"""Generation across processes (issue 14; dgh.generation.distributed): CPU, gloo, 2 processes, a tiny model built in
code. Processes are forked by the test (env:// rendezvous, the variables torchrun sets), so each test takes seconds.

What is promised and tested: with ``schedule=synchronous`` a K-process run gives bit-identical images and loss
history to the 1-process run with the same seed (same device type and threads per process); the cached global
moments equal the float64 statistics of the concatenated set; a checkpoint from K processes resumes at any K; a rank
that raises or dies ends every process within the timeout with a one-line error.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch

from dgh.generation import GenerationConfig, GenerationConfigError, Schedule, generate_images
from dgh.generation import engine
from dgh.generation.bn_stats import dataset_moments, find_bn_layers
from dgh.generation.distributed import (
    DistributedError,
    World,
    exchange_rows,
    keyed_seed,
    moment_bytes_per_step,
    open_world,
    pack_row,
    row_width,
    shard,
    torchrun_command,
    unpack_row,
)
from dgh.generation.output import CHECKPOINT_FILE
from dgh.models.spec import LoadedModel, ModelSpec
from tests.test_generation import TinyNet, _randomize_bn

TIMEOUT_S = 20.0
pytestmark = pytest.mark.usefixtures("one_thread")  # parent and ranks on one thread: equal threads per process, and
# see _child


def _loaded() -> LoadedModel:
    torch.manual_seed(0)
    spec = ModelSpec(name="tiny", family="test", task="classification", input_size=(8, 8), pad=2, num_classes=4,
                     output_loss_weight=1e-3)
    return LoadedModel(spec=spec, model=_randomize_bn(TinyNet()))


def _cfg(**kw) -> GenerationConfig:
    # 10 images in batches of 4 -> B = 3 of sizes 4, 4, 2: uneven shares over 2 ranks and unequal batch weights
    base = dict(n_images=10, iterations=4, batch_size=4, checkpoint_every=0, process_timeout_s=TIMEOUT_S)
    base.update(kw)
    return GenerationConfig.for_method("dgh", **base)


# --- process harness ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, size: int, port: int, target, args, out: Path) -> None:  # noqa: ANN001
    # A forked child must not start an OpenMP team of 2+ threads once the parent (an earlier test in this pytest
    # process) has run one: GNU libgomp's thread pool does not survive fork() and the child hangs in its first
    # parallel region (measured: conv2d with 2 threads before and after fork hangs; with 1 thread after, it ends).
    # torchrun, which the library uses, execs fresh interpreters and is not affected.
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        value = target(rank, *args)
        torch.save({"ok": value}, out / f"rank{rank}.pt")
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        torch.save({"error": str(exc), "type": type(exc).__name__, "tb": traceback.format_exc()}, out / f"rank{rank}.pt")
    os._exit(0)


def _launch(size: int, target, args: tuple, tmp: Path, wait_s: float = 60.0,  # noqa: ANN001
            hung: tuple[int, ...] = ()) -> tuple[list[dict | None], float]:
    """Run ``target(rank, *args)`` in ``size`` forked processes; returns each rank's report (None: it died without
    one) and the wall time until all but the ``hung`` ranks ended (those are killed, as torchrun would)."""
    out = tmp / f"reports_{time.monotonic_ns()}"
    out.mkdir()
    ctx = mp.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, size, port, target, args, out)) for r in range(size)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for r, p in enumerate(procs):
        if r not in hung:
            p.join(wait_s)
    wall = time.perf_counter() - t0
    alive = [r for r, p in enumerate(procs) if p.is_alive() and r not in hung]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"rank(s) {alive} still running after {wait_s} s (a hang)"
    reports = []
    for r in range(size):
        f = out / f"rank{r}.pt"
        reports.append(torch.load(f, weights_only=False) if f.is_file() else None)  # our own file
    return reports, wall


def _ok(reports: list[dict | None]) -> list:
    for r, rep in enumerate(reports):
        assert rep is not None and "ok" in rep, f"rank {r}: {rep and rep.get('tb')}"
    return [rep["ok"] for rep in reports]


def _run_generate(rank: int, cfg: GenerationConfig, out_dir: str | None, resume: bool, exit_at: int | None) -> dict:
    def cb(iteration: int, metrics: dict) -> None:
        if exit_at is not None and iteration == exit_at:
            os._exit(17)  # killed: no cleanup, no report

    res = generate_images(_loaded(), cfg, out_dir=out_dir, resume=resume, progress=False, device="cpu", callback=cb)
    return {"images": res.images_nchw, "history": res.history}


def _one_process(cfg: GenerationConfig, out_dir: Path | None = None, resume: bool = False):  # noqa: ANN202
    res = generate_images(_loaded(), cfg, out_dir=out_dir, resume=resume, progress=False, device="cpu")
    return res.images_nchw, res.history


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


# --- pure helpers ------------------------------------------------------------------------------------------------
def test_shards_are_fixed_disjoint_and_cover_all_batches():
    for n_batches in (1, 3, 8, 9):
        for size in range(1, n_batches + 1):
            parts = [shard(n_batches, r, size) for r in range(size)]
            flat = sorted(b for p in parts for b in p)
            assert flat == list(range(n_batches))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        shard(4, 2, 2)


def test_keyed_seed_depends_on_every_key_part_not_on_anything_else():
    a = keyed_seed(0, "step", 3, 1)
    assert a == keyed_seed(0, "step", 3, 1)
    assert len({a, keyed_seed(1, "step", 3, 1), keyed_seed(0, "step", 4, 1), keyed_seed(0, "step", 3, 2),
                keyed_seed(0, "init", 3, 1)}) == 5
    assert 0 <= a < 2**63


def test_pack_unpack_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    ms = [torch.randn(c, generator=g) for c in (6, 5, 3)]
    ss = [torch.rand(c, generator=g) for c in (6, 5, 3)]
    terms = [1 / 3, -2.5e-7, 5.100941499074301, 16.0]
    row = pack_row(ms, ss, terms)
    assert row.dtype == torch.float32 and row.shape == (row_width([6, 5, 3]),)
    m2, s2, t2 = unpack_row(row, [6, 5, 3])
    assert all(torch.equal(a, b) for a, b in zip(ms + ss, m2 + s2))
    assert t2 == terms  # float64 bits survive the float32 table


def test_one_process_exchange_and_traffic_figure():
    rows = {b: torch.full((row_width([2]),), float(b)) for b in range(3)}
    table = exchange_rows(World(), rows, 3, row_width([2]), torch.device("cpu"))
    assert torch.equal(table[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(DistributedError, match="boom"):
        exchange_rows(World(), {}, 3, row_width([2]), torch.device("cpu"), failure="boom")
    assert moment_bytes_per_step([64, 128], 8) == 8 * 2 * 192 * 4


def test_processes_without_a_launcher_and_sequential_in_several_processes_are_clear_errors(monkeypatch):
    with pytest.raises(GenerationConfigError, match="torchrun"):
        generate_images(_loaded(), _cfg(processes=2), progress=False, device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")  # raised before any process group is joined
    with pytest.raises(GenerationConfigError, match="schedule=sequential cannot run in 2 processes"):
        generate_images(_loaded(), _cfg(schedule="sequential"), progress=False, device="cpu")
    with pytest.raises(GenerationConfigError, match="processes=3 but this run has 2"):
        generate_images(_loaded(), _cfg(processes=3), progress=False, device="cpu")


def test_synchronous_schedule_is_reproducible_and_differs_from_sequential():
    a, ha = _one_process(_cfg(schedule="synchronous"))
    b, hb = _one_process(_cfg(schedule="synchronous"))
    c, _ = _one_process(_cfg())
    assert torch.equal(a, b) and ha == hb
    assert not torch.equal(a, c)  # another schedule and other draws: not the sequential images


# --- two processes -----------------------------------------------------------------------------------------------
def _moments_worker(rank: int) -> dict:
    loaded = _loaded()
    cfg = _cfg(iterations=0)
    with open_world(torch.device("cpu"), TIMEOUT_S) as world:
        run = engine._Run(loaded, cfg, torch.device("cpu"), world)
        run.check_input_and_find_last_bns()
        state = run.new_state()
        w = run.weights.double().unsqueeze(1)
        mus = [(w * c.double()).sum(0) for c in state.cache_m]
        secs = [(w * c.double()).sum(0) for c in state.cache_s]
        images = run.final_images_synchronous(state)
        return {"owned": run.owned, "mu": mus, "sec": secs, "images": images, "size": world.size}


def test_global_moments_on_two_ranks_equal_float64_statistics_of_the_concatenated_set(tmp_path):
    reports, _ = _launch(2, _moments_worker, (), tmp_path)
    r0, r1 = _ok(reports)
    assert r0["size"] == 2 and r0["owned"] == [0, 2] and r1["owned"] == [1]
    for a, b in zip(r0["mu"] + r0["sec"], r1["mu"] + r1["sec"]):
        assert torch.equal(a, b)  # the cache is the same bits on both ranks
    images = r0["images"]
    assert images.shape == (10, 3, 8, 8) and r1["images"] is None
    model = _loaded().model
    means, seconds, in_m, in_s = dataset_moments(model, images.double(), find_bn_layers(model.double()), 3)
    for got, want in zip(r0["mu"] + r0["sec"], means + [in_m] + seconds + [in_s]):
        scale = want.abs().clamp_min(1e-3)
        assert float(((got - want).abs() / scale).max()) < 1e-6


def test_two_processes_give_the_one_process_images_bit_for_bit(tmp_path):
    reports, _ = _launch(2, _run_generate, (_cfg(), None, False, None), tmp_path)
    r0, r1 = _ok(reports)
    ref, ref_hist = _one_process(_cfg(schedule="synchronous"))
    assert _digest(r0["images"]) == _digest(ref)
    assert r0["history"] == ref_hist == r1["history"]
    assert r1["images"].shape[0] == 0  # rank 0 holds the result


def test_a_killed_two_process_run_resumes_at_two_and_at_one_process_and_the_reverse(tmp_path):
    ref, ref_hist = _one_process(_cfg(schedule="synchronous"))
    cfg = _cfg(checkpoint_every=2)
    out = tmp_path / "k2"
    reports, _ = _launch(2, _run_generate, (cfg, str(out), False, 3), tmp_path)
    assert reports == [None, None]  # both killed after iteration 3; the checkpoint of iteration 2 is on disk
    assert (out / CHECKPOINT_FILE).is_file() and not (out / "images.pt").exists()
    copy = tmp_path / "k2_copy"
    shutil.copytree(out, copy)
    reports, _ = _launch(2, _run_generate, (cfg, str(out), True, None), tmp_path)
    r0, _ = _ok(reports)
    assert torch.equal(r0["images"], ref) and r0["history"] == ref_hist
    assert not (out / CHECKPOINT_FILE).exists() and (out / "images.pt").is_file()
    images, hist = _one_process(cfg.model_copy(update={"schedule": Schedule.SYNCHRONOUS}), copy, resume=True)
    assert torch.equal(images, ref) and hist == ref_hist
    # the reverse: a 1-process checkpoint resumed by 2 processes
    one = tmp_path / "k1"
    reports, _ = _launch(1, _run_generate, (cfg.model_copy(update={"schedule": Schedule.SYNCHRONOUS}), str(one), False, 3),
                         tmp_path)
    assert reports == [None] and (one / CHECKPOINT_FILE).is_file()
    reports, _ = _launch(2, _run_generate, (cfg, str(one), True, None), tmp_path)
    r0, _ = _ok(reports)
    assert torch.equal(r0["images"], ref) and r0["history"] == ref_hist


HANG_TIMEOUT_S = 3.0


def _failing_worker(rank: int, how: str) -> dict:
    real_step = engine._Run.step

    def step(self, b, state, *args, **kw):  # noqa: ANN001, ANN202
        if rank == 1 and state.iteration == 1:
            if how == "die":
                os._exit(9)
            if how == "hang":
                time.sleep(120)
            raise RuntimeError("injected failure\nsecond line")
        return real_step(self, b, state, *args, **kw)

    engine._Run.step = step
    timeout = HANG_TIMEOUT_S if how == "hang" else TIMEOUT_S
    generate_images(_loaded(), _cfg(process_timeout_s=timeout), progress=False, device="cpu")
    return {}


@pytest.mark.parametrize("how", ["raise", "die", "hang"])
def test_a_rank_that_raises_dies_or_hangs_ends_the_run_within_the_timeout(tmp_path, how):
    hung = (1,) if how == "hang" else ()
    reports, wall = _launch(2, _failing_worker, (how,), tmp_path, wait_s=TIMEOUT_S + 30, hung=hung)
    limit = HANG_TIMEOUT_S if how == "hang" else TIMEOUT_S
    assert wall < limit + 10
    r0 = reports[0]
    assert r0 is not None and r0.get("type") == "DistributedError", r0
    assert "\n" not in r0["error"]
    if how == "raise":  # reported at once, the same line on every rank
        assert r0["error"] == "rank 1/2 failed: iteration 2: injected failure"
        assert reports[1]["error"] == r0["error"]
    else:  # the peer's connection closes (die) or the collective times out (hang)
        assert reports[1] is None and r0["error"].startswith("rank 0/2: the moment all-gather failed or timed out")
        if how == "hang":
            assert wall > HANG_TIMEOUT_S - 0.5


# --- the single-process path is unchanged ------------------------------------------------------------------------
# sha256 of images.numpy().tobytes() (first 16 hex) of _loaded() with _cfg() (sequential schedule), torch 2.14.1 CPU,
# x86_64, 1 thread, per CPU capability (the kernels, hence the float rounding, differ): AVX512 computed with the
# engine before issue 14 (commit dd27d43) and again after it; AVX2 (an AVX2-only AMD EPYC) with the engine of
# b9eea1d, whose exact path the later commits leave unchanged.
SEQUENTIAL_KNOWN = {
    "AVX512": {"": "7bc857814d3a515f", "image": "25a3488420229e11", "lazy": "54e2852317495627"},
    "AVX2": {"": "19411a3e8b27ad4e", "image": "a272971f61da4a5a", "lazy": "20a1045d4218403b"},
}


@pytest.mark.skipif(not torch.__version__.startswith("2.14.1") or os.uname().machine != "x86_64"
                    or torch.backends.cpu.get_cpu_capability() not in SEQUENTIAL_KNOWN,
                    reason="known answer recorded with torch 2.14.1 on x86_64 CPUs with AVX512 or AVX2 kernels")
@pytest.mark.parametrize("variant", ["", "image", "lazy"])
def test_single_process_sequential_images_are_those_of_the_engine_before_issue_14(variant):
    kw = {"image": {"augment_draw": "image"}, "lazy": {"lazy_refresh": True}}.get(variant, {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, _ = _one_process(_cfg(**kw))
    finally:
        torch.set_num_threads(threads)
    assert _digest(images)[:16] == SEQUENTIAL_KNOWN[torch.backends.cpu.get_cpu_capability()][variant]


# --- launch: CLI option and DVC stage ----------------------------------------------------------------------------
def test_torchrun_command():
    cmd = torchrun_command(3, "dgh.cli", ["generate", "--processes", 3], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                   "--local-ranks-filter=0", "-m", "dgh.cli", "generate", "--processes", "3"]


def test_dvc_stage_and_cli_turn_processes_into_a_torchrun_launch(tmp_path, monkeypatch):
    import yaml
    from typer.testing import CliRunner

    import dgh.cli as cli
    import dgh.pipeline.generate as stage
    from dgh.models.cifar_resnet import cifar_resnet
    from dgh.pipeline.common import open_project

    calls = []
    monkeypatch.setattr(stage, "launch", lambda k, module, args: calls.append((k, module, list(args))) or 0)
    monkeypatch.setattr(cli, "launch", lambda k, module, args: calls.append((k, module, list(args))) or 0)
    monkeypatch.delenv("DGH_ASSETS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.save({"state_dict": cifar_resnet(20).state_dict()}, tmp_path / "r20.th")
    params = {"assets": str(tmp_path), "device": "cpu", "progress": False,
              "models": {"resnet20_cifar10": {"weights": "r20.th"}},
              "generate": {"r20-k2": {"model": "resnet20_cifar10", "method": "dgh", "n_images": 8, "batch_size": 4,
                                      "iterations": 1, "processes": 2}}}
    path = tmp_path / "my_params.yaml"
    path.write_text(yaml.safe_dump(params))
    project = open_project(path, track=False)
    assert project.params.generation("r20-k2").config.processes == 2
    stage.run_generate(project, "r20-k2")
    assert calls == [(2, "dgh.pipeline.generate", ["r20-k2", "--params", str(path.resolve())])]
    calls.clear()
    argv = ["generate", "--model", "resnet20_cifar10", "--weights", str(tmp_path / "r20.th"), "--out",
            str(tmp_path / "o"), "--n-images", "8", "--batch-size", "4", "--processes", "2", "--device", "cpu"]
    monkeypatch.setattr("sys.argv", ["dgh", *argv])
    res = CliRunner().invoke(cli.app, argv)
    assert res.exit_code == 0, res.output
    assert calls == [(2, "dgh.cli", argv)]
    assert not (tmp_path / "o" / "images.pt").exists()  # the parent only launches


def test_sequential_schedule_with_several_processes_is_refused_by_the_config():
    with pytest.raises(GenerationConfigError, match="schedule=sequential cannot run in 2 processes"):
        _cfg(processes=2, schedule="sequential")


def test_more_processes_than_batches_is_refused_by_the_config():
    """10 images in batches of 4 are 3 batches: 3 processes fit, 4 leave one without a batch."""
    _cfg(processes=3)
    with pytest.raises(GenerationConfigError, match="processes=4 but only 3 batch"):
        _cfg(processes=4)
