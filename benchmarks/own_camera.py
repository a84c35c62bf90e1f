"""Your own camera, end to end, on a simulated camera: shoot -> calibrate-noise -> train on clean files -> eval vs BM3D.

    python benchmarks/own_camera.py --work /tmp/own_camera [--camera benchmarks/cameras/poisson_gaussian.json]
                                    [--read-noise gaussian] [--steps 2200] [--scenes 24] [--size 512]
                                    [--crop 256] [--width 24] [--threads N]

1. `synth --calibration-shoot` of the camera (4 ISOs, 8 darks + 3 flat pairs each), then
   `calibrate-noise` -> camera.json; the recovered K / scales are printed against the truth.
2. `synth` with that camera's noise (`--noise-camera CAMERA --read-noise ...`): clean long
   exposures and the camera's dark short exposures; the training scenes' long files are copied
   into a clean folder.
3. Two trainings of configs/demo.yaml on the clean folder (`data.kind: clean_folder`), same seed
   and steps, one with the *recovered* parameters (camera.json) and one with the *true* ones
   (the shoot's true_camera.json).
4. `rawrestore eval` of both on the camera's dark test pairs, with BM3D as the classical
   reference; prints PSNR / SSIM / dE00 per ratio, recovered - true, and model - BM3D.

Everything runs through the `rawrestore` command as a user would (subprocesses, this checkout
first on PYTHONPATH). Writes only under --work. Needs `pip install bm3d` for the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


THREADS: dict[str, str] = {}


def rawrestore(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **THREADS)
    command = [sys.executable, "-m", "rawrestore", *args]
    print("$ rawrestore " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env=env, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for everything this writes (created; must be new or empty)")
    parser.add_argument("--camera", default=str(HERE / "cameras" / "poisson_gaussian.json"), help="true noise of the camera")
    parser.add_argument("--read-noise", default="gaussian", choices=("tukey", "gaussian"))
    parser.add_argument("--steps", type=int, default=2200, help="training steps per model (the demo's 2200)")
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--size", type=int, default=512, help="frame side of the synthetic scenes")
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--width", type=int, default=24, help="U-Net width (the demo's 24)")
    parser.add_argument("--classical", default="bm3d", choices=("bm3d", "wavelet"))
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads of each command (1 on a busy shared machine: oversubscribed OpenMP is ~50x slower)")
    args = parser.parse_args()
    if args.threads is not None:
        THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    work = Path(args.work).resolve()
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work {work} is not empty; choose a new folder")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    rawrestore("synth", "--calibration-shoot", "--out", str(work / "shoot"), "--size", "256",
               "--noise-camera", args.camera, "--read-noise", args.read_noise)
    rawrestore("calibrate-noise", "--dark", str(work / "shoot/dark"), "--flat", str(work / "shoot/flat"),
               "--out", str(work / "camera.json"), "--report", str(work / "report"))
    truth = json.loads((work / "shoot/shoot_truth.json").read_text())["per_iso"]
    recovered = json.loads((work / "camera.json").read_text())["per_iso"]
    print("ISO     K true/recovered      read scale true/recovered   row true/recovered")
    for t, r in zip(truth, recovered):
        read = r["gauss_sigma"] if t["read_noise"] == "gaussian" else r["tukey_scale"]
        print(f"{t['iso']:<7g} {t['system_gain']:8.4f} {r['K']:8.4f}   {t['read_scale']:8.3f} {read:8.3f}        "
              f"{t['row_scale']:6.3f} {r['row_scale']:6.3f}")

    rawrestore("synth", "--out", str(work / "data"), "--scenes", str(args.scenes), "--size", str(args.size),
               "--noise-camera", args.camera, "--read-noise", args.read_noise)
    clean = work / "clean"
    clean.mkdir()
    for path in sorted((work / "data/Sony/long").glob("0*.dng")):  # training scenes only (ids 0xxxx)
        shutil.copy2(path, clean / path.name)

    results = {}
    for name, noise in (("recovered", work / "camera.json"), ("true", work / "shoot/true_camera.json")):
        run = work / f"run_{name}"
        common = [f"data.noise_camera={noise}", f"data.crop_size={args.crop}", f"model.width={args.width}",
                  "eval.self_ensemble=false", "eval.tile=0", "eval.overlap=0", "device=cpu", "seed=0"]
        rawrestore("train", "-c", "configs/demo.yaml", "--no-progress", "data.kind=clean_folder", f"data.root={clean}",
                   "data.synthetic_ratio=[100,300]", "data.val_share=0.1", f"data.val_crop={args.crop}",
                   f"data.cache_dir={work / 'cache'}", f"train.iterations={args.steps}", f"output_dir={run}",
                   f"train.val_every={args.steps}", f"train.ckpt_every={args.steps}",
                   f"train.warmup_iters={min(50, args.steps // 10)}", *common)
        rawrestore("eval", "-c", "configs/demo.yaml", "--checkpoint", str(run / "checkpoints/last.pt"),
                   "--out", str(run / "eval"), "--split", "test", "--classical", args.classical if name == "recovered" else "none", "--no-images",
                   "data.kind=sid", f"data.root={work / 'data'}", "data.synthetic_noise=false",
                   f"data.cache_dir={work / 'data/.cache'}", *common)
        results[name] = json.loads((run / "eval/summary.json").read_text())

    groups = [g for g in results["true"]["model"] if g != "all"] + ["all"]
    print(f"\n{args.steps} steps, crop {args.crop}, width {args.width}; test pairs of the simulated camera "
          f"({args.camera}, {args.read_noise} read noise); {time.perf_counter() - started:.0f} s in all")
    print("group  | recovered PSNR  dE00 | true PSNR  dE00 | recovered-true dB | recovered-" + args.classical
          + " dB, dE00 | input PSNR")
    for group in groups:
        rec, tru = results["recovered"]["model"][group], results["true"]["model"][group]
        ref = results["recovered"]["classical"][group]
        base = results["recovered"]["baseline"][group]
        print(f"{group:6} | {rec['psnr']:8.2f} {rec['delta_e00']:6.2f} | {tru['psnr']:8.2f} {tru['delta_e00']:5.2f} | "
              f"{rec['psnr'] - tru['psnr']:+8.2f}          | {rec['psnr'] - ref['psnr']:+6.2f} {rec['delta_e00'] - ref['delta_e00']:+6.2f}"
              f"          | {base['psnr']:6.2f}")
    (work / "own_camera.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
