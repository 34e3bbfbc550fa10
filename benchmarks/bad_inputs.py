"""Bad-input sweep: run the ``dgh`` CLI on inputs it must refuse (or interpret correctly) and tabulate the outcome.

Each case builds its files in a temporary folder from the real assets, runs one CLI command in-process (Typer's
``CliRunner``; ``--subprocess`` runs ``python -m dgh.cli`` instead) and records the exit status and the last line
of the output. A traceback shows as ``TRACEBACK <type>: <message>``. The expected outcome is exit status 2 with a
one-line ``error: ...`` message, except the ``ok:`` cases, where exit 0 and a correct number are expected.

Usage (from the project root; ``DGH_ASSETS`` defaults to ``../shared/assets``)::

    python benchmarks/bad_inputs.py                 # all cases, a markdown table on stdout
    python benchmarks/bad_inputs.py --only exif     # cases whose id contains 'exif'
    python benchmarks/bad_inputs.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dgh.env import configure_offline

configure_offline()

ASSETS = Path(os.environ.get("DGH_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))
R20 = ASSETS / "cifar10" / "models" / "resnet20-12fca82f.th"
Y5N = ASSETS / "coco" / "models" / "yolov5n.pt"
VAL = ASSETS / "coco" / "val2017-128"
TRAIN = ASSETS / "coco" / "train2017-128"
CIFAR_TEST = ASSETS / "cifar10" / "test"
EXIF_ORIENTATION = 0x0112


@dataclass
class Case:
    """One row: ``setup(tmp) -> argv`` (the CLI arguments after ``dgh``)."""

    id: str
    listed: bool  # one of the inputs the issue lists (else part of our own sweep)
    what: str
    setup: Callable[[Path], list[str]]


# ------------------------------------------------------------------------------------------ builders
def cifar_subset(tmp: Path, names: list[str] | None = None, per_class: int = 20) -> Path:
    """A CIFAR-10 ImageFolder with ``per_class`` test images per class; folder i renamed to ``names[i]``."""
    root = tmp / "cifar"
    for i, cls in enumerate(sorted(p.name for p in CIFAR_TEST.iterdir())):
        dst = root / (names[i] if names else cls)
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted((CIFAR_TEST / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / f.name)
    return root


def eval_cifar(data: Path, *extra: str) -> list[str]:
    return ["evaluate-imagenet", "--model", "resnet20_cifar10", "--weights", str(R20), "--data", str(data),
            "--metrics-out", str(data.parent / "metrics.json"), "--no-progress", "--device", "cpu", *extra]


def val_subset(tmp: Path, n: int = 4) -> tuple[Path, Path]:
    """The first ``n`` val2017-128 images and their YOLO labels (+ data.yaml)."""
    images, labels = tmp / "det" / "images", tmp / "det" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for f in sorted((VAL / "images").iterdir())[:n]:
        shutil.copy(f, images / f.name)
        label = VAL / "labels" / f"{f.stem}.txt"
        if label.is_file():
            shutil.copy(label, labels / label.name)
    shutil.copy(VAL / "data.yaml", tmp / "det" / "data.yaml")
    return images, labels


def eval_coco(images: Path, *gt: str) -> list[str]:
    return ["evaluate-coco", "--model", "yolov5n", "--weights", str(Y5N), "--images", str(images), *gt,
            "--imgsz", "320", "--metrics-out", str(images.parent / "metrics.json"), "--no-progress",
            "--device", "cpu"]


def bad_label(line: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        images, labels = val_subset(tmp)
        first = sorted(labels.iterdir())[0]
        first.write_text(first.read_text() + line + "\n")
        return eval_coco(images, "--labels", str(labels))

    return setup


def coco_json(tmp: Path, edit: Callable[[dict], None], n: int = 4) -> list[str]:
    """The first ``n`` train2017-128 images with the real json after ``edit(gt)``."""
    images = tmp / "train" / "images"
    images.mkdir(parents=True)
    for f in sorted((TRAIN / "images").iterdir())[:n]:
        shutil.copy(f, images / f.name)
    gt = json.loads((TRAIN / "annotations" / "instances_train2017.json").read_text())
    edit(gt)
    ann = tmp / "train" / "instances.json"
    ann.write_text(json.dumps(gt))
    return eval_coco(images, "--annotations", str(ann))


def first_used_annotation(gt: dict, n: int = 4) -> dict:
    """The first annotation of an image among the first ``n`` files (the ones :func:`coco_json` copies)."""
    names = sorted(p.name for p in (TRAIN / "images").iterdir())[:n]
    ids = {im["id"] for im in gt["images"] if im["file_name"] in names}
    return next(a for a in gt["annotations"] if a["image_id"] in ids)


def quantize_with(images_pt: object, meta: dict | None = None) -> Callable[[Path], list[str]]:
    """``dgh quantize --calib DIR`` where DIR/images.pt holds ``images_pt(noise_nchw)``."""

    def setup(tmp: Path) -> list[str]:
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(8, 3, 32, 32, generator=gen).clamp(-2.0, 2.2)
        calib = tmp / "calib"
        calib.mkdir()
        obj = images_pt(noise) if callable(images_pt) else images_pt
        torch.save(obj, calib / "images.pt")
        if meta is not None:
            (calib / "meta.json").write_text(json.dumps(meta))
        return ["quantize", "--model", "resnet20_cifar10", "--weights", str(R20), "--calib", str(calib),
                "--preset", "pot", "--algorithm", "minmax", "--out", str(tmp / "q"), "--no-progress",
                "--device", "cpu"]

    return setup


def weights_file(obj: object, model: str = "resnet20_cifar10") -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "w.pt"
        torch.save(obj, path)
        return ["generate", "--model", model, "--weights", str(path), "--out", str(tmp / "g"), "--n-images", "2",
                "--iters", "1", "--no-progress", "--device", "cpu"]

    return setup


def exif_rotated_copy(tmp: Path) -> list[str]:
    """One val image stored rotated (pixels turned 90 degrees clockwise) with EXIF orientation 8, which displays it
    upright again: mAP must equal the mAP of the upright file (the 'ok:exif-original' row). Both lossless PNG, so
    the pixels are identical and any difference is geometry."""
    images, labels = val_subset(tmp, 1)
    f = sorted(images.iterdir())[0]
    upright = np.asarray(Image.open(f).convert("RGB"))
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, -1)))
    exif = stored.getexif()
    exif[EXIF_ORIENTATION] = 8  # display: rotate 90 degrees counter-clockwise -> upright
    f.unlink()
    stored.save(f.with_suffix(".png"), exif=exif.tobytes())
    return eval_coco(images, "--labels", str(labels))


def exif_original(tmp: Path) -> list[str]:
    """The control of :func:`exif_rotated_copy`: the same image re-encoded upright with the same JPEG settings."""
    images, labels = val_subset(tmp, 1)
    f = sorted(images.iterdir())[0]
    Image.open(f).convert("RGB").save(f.with_suffix(".png"))
    f.unlink()
    return eval_coco(images, "--labels", str(labels))


def truncated_in_coco(tmp: Path) -> list[str]:
    images, labels = val_subset(tmp)
    f = sorted(images.iterdir())[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    return eval_coco(images, "--labels", str(labels))


def resume_truncated(tmp: Path) -> list[str]:
    out = tmp / "g"
    out.mkdir()
    torch.save({"format": "dgh-generation-checkpoint-v1", "canvases": [torch.zeros(2, 3, 40, 40)]},
               out / "checkpoint.pt")
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return ["generate", "--model", "resnet20_cifar10", "--weights", str(R20), "--out", str(out), "--n-images", "2",
            "--iters", "1", "--resume", "--no-progress", "--device", "cpu"]


def odd_image_in_folder(make: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        root = cifar_subset(tmp, per_class=2)
        make(root / "cat")
        return eval_cifar(root)

    return setup


def _float_tiff(folder: Path) -> None:
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(folder / "zz_float.tif")


def _text_as_jpg(folder: Path) -> None:
    (folder / "zz_notes.jpg").write_text("this is not an image")


def _sixteen_bit(folder: Path) -> None:  # positive case: decoded as 8-bit gray
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(folder / "zz_16bit.png")


def _rgba(folder: Path) -> None:  # positive case
    Image.fromarray(np.full((32, 32, 4), 200, np.uint8)).save(folder / "zz_rgba.png")


REPO = Path.cwd()  # the project whose params.yaml the `check` cases edit (run from the project root)


def params_with(edit: Callable[[dict], None]) -> Callable[[Path], list[str]]:
    """``dgh check --params`` on the project's params.yaml after ``edit(params_dict)`` (assets made absolute)."""

    def setup(tmp: Path) -> list[str]:
        import yaml

        data = yaml.safe_load((REPO / "params.yaml").read_text())
        data["assets"] = str(ASSETS)
        edit(data)
        path = tmp / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return ["check", "--params", str(path)]

    return setup


def first_experiment(data: dict) -> dict:
    """The first experiment entry (``experiments`` at the top, or under the ``imagenet``/``coco`` task)."""
    section = data.get("experiments") or data["imagenet"]["experiments"]
    return next(iter(section.values()))


def second_generate_on_same_out(tmp: Path) -> list[str]:
    """Start a long `dgh generate` in a subprocess, wait until it holds the --out lock, return the second run."""
    from filelock import FileLock, Timeout

    out = tmp / "g"
    argv = gen(tmp, "--iters", "100000", "--device", "cpu")
    first = subprocess.Popen([sys.executable, "-m", "dgh.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    RUNNING.append(first)
    try:
        from dgh.preflight import lock_path
    except ImportError:  # a build without the lock: give the first run time to start writing
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "checkpoint.pt").exists() and first.poll() is None:
            time.sleep(1.0)
        return gen(tmp, "--device", "cpu")
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        lock = FileLock(str(lock_path(out)), timeout=0)
        try:
            lock.acquire()
            lock.release()
            time.sleep(1.0)
        except Timeout:
            break  # held by the first run
    return gen(tmp, "--device", "cpu")  # the second run: 1 iteration on the same --out


RUNNING: list[subprocess.Popen] = []


def gen(tmp: Path, *extra: str) -> list[str]:
    return ["generate", "--model", "resnet20_cifar10", "--weights", str(R20), "--out", str(tmp / "g"),
            "--n-images", "2", "--iters", "1", "--no-progress", *extra]


def quant(tmp: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", "resnet20_cifar10", "--weights", str(R20), "--calib", "noise", "--n-calib", "8",
            "--preset", "pot", "--algorithm", "minmax", "--out", str(tmp / "q"), "--no-progress", *extra]


CASES: list[Case] = [
    # ----- listed in the issue
    Case("ok:cifar-names", True, "control: CIFAR test subset, correct class folder names",
         lambda t: eval_cifar(cifar_subset(t))),
    Case("cifar-numbered-1..10", True, "class folders renamed 1..10",
         lambda t: eval_cifar(cifar_subset(t, [str(i + 1) for i in range(10)]))),
    Case("cifar-airplane-plane", True, "class folder airplane renamed plane",
         lambda t: eval_cifar(cifar_subset(t, ["plane"] + sorted(p.name for p in CIFAR_TEST.iterdir())[1:]))),
    Case("ok:exif-original", True, "control: one val image, upright file", exif_original),
    Case("ok:exif-rotated", True, "the same image stored rotated + EXIF orientation 8 (same mAP expected)",
         exif_rotated_copy),
    Case("coco-truncated-jpeg", True, "a truncated JPEG among the evaluate-coco images", truncated_in_coco),
    Case("calib-uint8", True, "images.pt holding uint8 0..255",
         quantize_with(lambda x: (x.clamp(0, 1) * 255).to(torch.uint8))),
    Case("calib-1e30", True, "images.pt holding values around 1e30", quantize_with(lambda x: x * 1e30)),
    Case("set-lr-conflict", True, "generate --lr 16 --set lr=0.001", lambda t: gen(t, "--lr", "16", "--set", "lr=0.001")),
    Case("set-iterations", True, "generate --iters 1 --set iterations=3",
         lambda t: gen(t, "--iters", "1", "--set", "iterations=3")),
    Case("set-w-bits", True, "quantize --set w_bits=4 (no --w-bits)", lambda t: quant(t, "--set", "w_bits=4")),
    Case("coco-empty-annotations", True, 'COCO json with "annotations": []',
         lambda t: coco_json(t, lambda g: g.update(annotations=[]))),
    Case("yolo-nan", True, "YOLO label line with nan", bad_label("0 nan 0.5 0.1 0.1")),
    Case("yolo-centre-outside", True, "YOLO label centre x = 1.4", bad_label("0 1.4 0.5 0.1 0.1")),
    Case("yolo-negative-width", True, "YOLO label with negative width", bad_label("0 0.5 0.5 -0.1 0.1")),
    Case("weights-list", True, "weights file holding a list", weights_file([1, 2, 3])),
    Case("weights-tensor", True, "weights file holding a bare tensor", weights_file(torch.zeros(3))),
    Case("device-banana", True, "--device banana", lambda t: gen(t, "--device", "banana")),
    Case("resume-truncated", True, "--resume with a truncated checkpoint.pt", resume_truncated),
    # ----- our own sweep
    Case("yolo-6-columns", False, "YOLO label line with 6 columns (segment-like)", bad_label("0 0.5 0.5 0.1 0.1 0.3")),
    Case("yolo-class-80", False, "YOLO class id 80 for an 80-class model", bad_label("80 0.5 0.5 0.1 0.1")),
    Case("yolo-zero-height", False, "YOLO label with height 0", bad_label("3 0.5 0.5 0.1 0")),
    Case("yolo-class-float", False, "YOLO class id 1.5", bad_label("1.5 0.5 0.5 0.1 0.1")),
    Case("yolo-inf", False, "YOLO label with inf width", bad_label("2 0.5 0.5 inf 0.1")),
    Case("yolo-no-boxes", False, "YOLO label folder without any label file",
         lambda t: (lambda im, lb: ([p.unlink() for p in lb.glob("*.txt")], eval_coco(im, "--labels", str(lb)))[1])(
             *val_subset(t))),
    Case("coco-bbox-nan", False, "COCO json bbox with NaN",
         lambda t: coco_json(t, lambda g: first_used_annotation(g).update(bbox=[1, 2, float("nan"), 4]))),
    Case("coco-bad-category", False, "COCO json annotation with category_id 999",
         lambda t: coco_json(t, lambda g: first_used_annotation(g).update(category_id=999))),
    Case("coco-wrong-size", False, "COCO json width/height of another resolution (resized images)",
         lambda t: coco_json(t, lambda g: [im.update(width=im["width"] // 2, height=im["height"] // 2)
                                           for im in g["images"]])),
    Case("calib-nan", False, "images.pt with NaN rows",
         quantize_with(lambda x: x.index_fill(0, torch.tensor([3]), float("nan")))),
    Case("calib-inf", False, "images.pt with +inf", quantize_with(lambda x: x.index_fill(0, torch.tensor([0]), float("inf")))),
    Case("calib-1-channel", False, "images.pt with 1 channel", quantize_with(lambda x: x[:, :1])),
    Case("calib-16px", False, "images.pt at 16x16 for a 32x32 model", quantize_with(lambda x: x[:, :, :16, :16])),
    Case("calib-list", False, "images.pt holding a list", quantize_with([1, 2, 3])),
    Case("calib-float-0-255", False, "images.pt float 0..255 (not normalized)",
         quantize_with(lambda x: (x.clamp(0, 1) * 255).round())),
    Case("calib-unclamped-meta-lies", False, "images.pt 4x the range with meta.json clamp:false",
         quantize_with(lambda x: x * 40, {"settings": {"clamp": False}})),
    Case("image-float-tiff", False, "a 32-bit float TIFF in the ImageFolder", odd_image_in_folder(_float_tiff)),
    Case("image-text-as-jpg", False, "a text file named .jpg in the ImageFolder", odd_image_in_folder(_text_as_jpg)),
    Case("ok:image-16bit", False, "a 16-bit grayscale PNG in the ImageFolder (decoded, scaled to 8 bit)",
         odd_image_in_folder(_sixteen_bit)),
    Case("ok:image-rgba", False, "an RGBA PNG in the ImageFolder (alpha dropped)", odd_image_in_folder(_rgba)),
    Case("weights-dict-no-tensors", False, "torchvision resnet18 weights {'a': 1}", weights_file({"a": 1}, "resnet18")),
    Case("weights-truncated", False, "a truncated akamaster checkpoint",
         lambda t: (lambda p: (p.write_bytes(R20.read_bytes()[:50000]),
                               ["generate", "--model", "resnet20_cifar10", "--weights", str(p), "--out",
                                str(t / "g"), "--n-images", "2", "--iters", "1", "--no-progress"])[1])(t / "w.th")),
    Case("device-cuda-9", False, "--device cuda:9", lambda t: gen(t, "--device", "cuda:9")),
    Case("device-gpu0", False, "--device gpu0", lambda t: quant(t, "--device", "gpu0")),
    Case("calib-missing", False, "--calib pointing nowhere",
         lambda t: ["quantize", "--model", "resnet20_cifar10", "--weights", str(R20), "--calib", str(t / "nope"),
                    "--preset", "pot", "--out", str(t / "q")]),
    Case("check-preset-potato", True, "params.yaml experiment preset: potato",
         params_with(lambda d: first_experiment(d).update(preset="potato"))),
    Case("check-w-bits-12", True, "params.yaml experiment w_bits: 12",
         params_with(lambda d: first_experiment(d).update(w_bits=12))),
    Case("check-options-lrr", True, "params.yaml experiment options: {lrr: 3}",
         params_with(lambda d: first_experiment(d).update(options={"lrr": 3}))),
    Case("check-imgsz-100", True, "params.yaml yolov5n imgsz: 100",
         params_with(lambda d: d["models"]["yolov5n"].update(imgsz=100))),
    Case("check-device-gpu0", True, "params.yaml device: gpu0", params_with(lambda d: d.update(device="gpu0"))),
    Case("out-read-only", True, "generate --out /sys/dgh-out (read-only place)",
         lambda t: ["generate", "--model", "resnet20_cifar10", "--weights", str(R20), "--out", "/sys/dgh-out",
                    "--n-images", "2", "--iters", "1", "--no-progress"]),
    Case("out-is-file", True, "generate --out an existing file",
         lambda t: ((t / "f").write_text("x"), ["generate", "--model", "resnet20_cifar10", "--weights", str(R20),
                                                "--out", str(t / "f"), "--n-images", "2", "--iters", "1",
                                                "--no-progress"])[1]),
    Case("out-too-small-disk", True, "generate 10^6 images of 640 px: more than the free disk",
         lambda t: ["generate", "--model", "yolov5n", "--weights", str(Y5N), "--out", str(t / "g"),
                    "--n-images", "1000000", "--iters", "1", "--no-progress"]),
    Case("second-generate-same-out", True, "a second `dgh generate` on the --out of a running one",
         second_generate_on_same_out),
    Case("quant-out-is-file", False, "quantize --out an existing file",
         lambda t: ((t / "f").write_text("x"), quant(t)[:-3] + ["--out", str(t / "f"), "--no-progress"])[1]),
    Case("metrics-out-read-only", False, "evaluate-imagenet --metrics-out under /sys",
         lambda t: eval_cifar(cifar_subset(t, per_class=1))[:-5] + ["--metrics-out", "/sys/dgh/m.json",
                                                                    "--no-progress", "--device", "cpu"]),
    Case("check-generate-lr-string", False, "params.yaml generate entry lr: fast",
         params_with(lambda d: next(v for v in d["generate"].values() if v.get("method") == "dgh").update(lr="fast"))),
    Case("check-data-missing", False, "params.yaml generate real set with a missing data folder",
         params_with(lambda d: next(v for v in d["generate"].values() if v.get("method") == "real").update(
             data="nowhere/at/all"))),
    Case("imagefolder-numbered-twice", False, "numbered layout with folders 7 and 07",
         lambda t: (lambda r: ((r / "3").rename(r / "07"), eval_cifar(r, "--class-layout", "numbered"))[1])(
             cifar_subset(t, [str(i) for i in range(10)], per_class=2))),
]


# ------------------------------------------------------------------------------------------ running
def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_in_process(argv: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from dgh.cli import app

    result = CliRunner().invoke(app, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        return 1, f"TRACEBACK {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    text = (result.stderr if result.stderr_bytes else "") or result.output
    if result.exit_code == 0:
        text = result.output
    return result.exit_code, last_line(text)


def run_subprocess(argv: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "dgh.cli", *argv], capture_output=True, text=True, timeout=1200)
    text = proc.stderr if proc.returncode else proc.stdout
    if "Traceback (most recent call last)" in proc.stderr:
        return proc.returncode, "TRACEBACK " + last_line(proc.stderr)
    return proc.returncode, last_line(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only cases whose id contains this")
    parser.add_argument("--subprocess", action="store_true", help="run `python -m dgh.cli` per case")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    if not (ASSETS / "cifar10").is_dir():
        raise SystemExit(f"real assets not found at {ASSETS} (set DGH_ASSETS)")
    torch.set_num_threads(1)
    rows = []
    print("| case | listed | input | exit | message now | s |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        if args.only and args.only not in case.id:
            continue
        tmp = Path(tempfile.mkdtemp(prefix="dgh-bad-"))
        t0 = time.perf_counter()
        try:
            argv = case.setup(tmp)
            code, message = (run_subprocess if args.subprocess else run_in_process)(argv)
        except Exception as exc:  # noqa: BLE001 - a case that cannot be built is reported, not fatal
            code, message = -1, f"SETUP FAILED {type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
        finally:
            for proc in RUNNING:  # background runs a case started
                proc.kill()
                proc.wait()
            RUNNING.clear()
            shutil.rmtree(tmp, ignore_errors=True)
        row = {"id": case.id, "listed": case.listed, "what": case.what, "exit": code, "message": message,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        shown = message.replace("|", "\\|").replace(str(tmp), "<tmp>")
        print(f"| {case.id} | {'yes' if case.listed else ''} | {case.what} | {code} | {shown[:300]} | "
              f"{row['seconds']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
