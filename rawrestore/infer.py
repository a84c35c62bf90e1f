"""`rawrestore infer`: restore one dark RAW file at full resolution, in overlapping tiles.

    rawrestore infer INPUT --checkpoint CKPT [--ratio R | --reference-exposure S] -o OUT.png [--dng OUT.dng] [key=value ...]

The exposure ratio is `--ratio`, or the reference exposure (default 10 s, SID's long exposures)
divided by the file's exposure time, capped at data.ratio_cap like training. The input is
black/white normalised, multiplied by the ratio (clipped to [0, 1] when data.clip_aligned),
packed, restored tile by tile (`rawrestore.tiling.tiled_apply`, eval.tile / eval.overlap, or
--tile / --overlap; `eval.self_ensemble=true` averages over the CFA-preserving flips and
transposes, `rawrestore.ensemble`), unpacked, and rendered by `isp.ISP` to the PNG. With --dng the restored
mosaic goes back to DN with the input's black and white levels and is written by
`isp.write_dng` with the input's CFA, levels, white balance and colour matrix; its exposure time
is the reference exposure (input exposure x ratio when --ratio was given).

The model config comes from the checkpoint (the resolved config saved in it); `-c CFG` uses a
file instead, and key=value overrides apply on top of either.

The outputs are checked before any work (`isp.safeio`: a new path or a regular file, never the
input, the checkpoint or the config) and written through temporary files, so both appear or
neither and nothing that was there is removed; a ratio that makes the image non-finite or clips
every pixel is an error, not an all-black PNG.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import isp
from isp.png import write_png
from isp.safeio import atomic_output, check_output
from rawrestore.config import ExperimentConfig, apply_overrides, from_dict, load_config
from rawrestore.errors import ConfigError, InputError
from rawrestore.folders import check_folder, new_folders
from rawrestore.physics.align import align_exposure, exposure_ratio
from rawrestore.ensemble import restore
from rawrestore.protocols import render_picture

__all__ = ["configure", "run", "restore_file", "resolve_ratio", "DEFAULT_REFERENCE_EXPOSURE_S", "DEFAULT_TILE"]

DEFAULT_REFERENCE_EXPOSURE_S = 10.0  # SID's long exposures (Sony: 10 s and 30 s; 10 s for most scenes)
DEFAULT_TILE = 512  # packed pixels per tile side when the config says 0 (whole frames)


def resolve_ratio(meta: isp.CameraMeta, ratio: float | None, reference_exposure_s: float | None, cap: float,
                  source: str) -> tuple[float, str]:
    """Exposure ratio to apply. -> (ratio, how it was found); InputError when neither option nor metadata gives one."""
    if ratio is not None:
        if not (np.isfinite(ratio) and ratio > 0):
            raise InputError(f"--ratio must be a positive number, got {ratio}")
        return float(ratio), "given"
    if reference_exposure_s is None or not (np.isfinite(reference_exposure_s) and reference_exposure_s > 0):
        raise InputError(f"--reference-exposure must be a positive number of seconds, got {reference_exposure_s}")
    if not meta.exposure_time:
        raise InputError(f"{source} has no exposure time in its metadata; pass --ratio R (e.g. 100, 250 or 300)")
    value = exposure_ratio(meta.exposure_time, reference_exposure_s, cap=cap)
    return value, f"{reference_exposure_s:g} s / {meta.exposure_time:g} s" + (f" capped at {cap:g}" if value == cap else "")


def _check_outputs(out_png: Path, out_dng: Path | None, inputs: list[Path]) -> None:
    """Refuse, before any work, outputs that are inputs, the same file twice, or not new/regular files."""
    check_folder(out_png.parent, "-o")
    check_output(out_png, inputs, "-o")
    if out_dng is not None:
        if os.path.abspath(out_dng) == os.path.abspath(out_png):
            raise InputError(f"--dng {out_dng} is the same file as -o; name two different files")
        check_folder(out_dng.parent, "--dng")
        check_output(out_dng, inputs, "--dng")


def _check_finite(tensor: torch.Tensor, ratio: float, what: str) -> None:
    """InputError when the ratio made the image non-finite or clipped every pixel to one value."""
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"exposure ratio {ratio:g} makes the {what} non-finite (float32 overflow); "
                         "give a ratio the model was trained for (SID: 100 to 300)")
    if what == "restored image" and (float(tensor.max()) <= 0.0 or float(tensor.min()) >= 1.0):
        shade = "black" if float(tensor.max()) <= 0.0 else "white"
        raise InputError(f"the restored image is entirely {shade} (every pixel clipped) at exposure ratio {ratio:g}; "
                         "nothing was written: give a ratio the model was trained for (SID: 100 to 300)")


def _config_for(checkpoint: str | os.PathLike, config: str | None, overrides: list[str]) -> ExperimentConfig:
    """The config a checkpoint was trained with (or `config`), plus overrides."""
    if config is not None:
        return load_config(config, overrides)
    from rawrestore.train.checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint).get("config")
    if not saved:
        raise ConfigError(f"checkpoint {checkpoint} holds no config; pass -c CONFIG.yaml")
    return from_dict(apply_overrides(saved, overrides))


@torch.no_grad()
def restore_file(path: str | os.PathLike, checkpoint: str | os.PathLike, out_png: str | os.PathLike,
                 cfg: ExperimentConfig, ratio: float | None = None,
                 reference_exposure_s: float = DEFAULT_REFERENCE_EXPOSURE_S, out_dng: str | os.PathLike | None = None,
                 tile: int | None = None, overlap: int | None = None, bits: int = 8,
                 other_inputs: tuple[str | os.PathLike, ...] = ()) -> dict[str, object]:
    """Restore one RAW file; write the PNG (and DNG). -> {ratio, ratio_source, shape, seconds, used_ema, meta_out}.

    Neither output may be the input, the checkpoint or one of `other_inputs` (a config file).
    """
    from rawrestore.evaluate import load_model

    started = time.perf_counter()
    out_png = Path(out_png)
    out_dng = None if out_dng is None else Path(out_dng)
    inputs = [Path(path), Path(checkpoint), *(Path(p) for p in other_inputs)]
    _check_outputs(out_png, out_dng, inputs)
    device = isp.resolve_device(cfg.device)
    mosaic, meta = isp.read_raw(path)
    period = meta.cfa_period
    # the data section this file's sensor trained under: the data config, or the first source of its CFA period
    section = next((source for source in cfg.data.source_list() if source.cfa_period == period), None)
    if section is None:
        kind = "X-Trans (6x6)" if period == 6 else "Bayer (2x2)"
        cameras = ", ".join(dict.fromkeys(source.camera for source in cfg.data.source_list()))
        raise InputError(f"{path} has a {kind} CFA but the model was trained for data.camera={cameras}; "
                         "use a checkpoint trained on this kind of sensor")
    value, how = resolve_ratio(meta, ratio, reference_exposure_s, section.ratio_cap, str(path))
    # whole CFA periods only (packing needs them); a partial last row/column of periods is dropped
    height, width = (mosaic.shape[0] // period) * period, (mosaic.shape[1] // period) * period
    mosaic = mosaic[:height, :width]
    model, step, used_ema = load_model(cfg, checkpoint, device)

    cfa = torch.as_tensor(meta.cfa_array, device=device)
    black = torch.tensor(meta.black_level, dtype=torch.float32, device=device)
    raw = torch.from_numpy(mosaic.astype(np.float32)).to(device)[None, None]
    aligned = align_exposure(isp.ops.normalize(raw, black, meta.white_level), value, clip=section.clip_aligned)
    del raw
    _check_finite(aligned, value, "aligned input")
    model_input = isp.cfa.pack(aligned, cfa) if cfg.data.packed else aligned
    del aligned
    tile_size = tile if tile is not None else (cfg.eval.tile or DEFAULT_TILE)
    overlap_size = overlap if overlap is not None else (cfg.eval.overlap if cfg.eval.tile else 32)
    restored = restore(model, model_input, cfa, tile_size, overlap_size, cfg.eval.self_ensemble, cfg.data.packed)
    del model_input
    _check_finite(restored.clamp(0.0, 1.0), value, "restored image")
    restored.clamp_(0.0, 1.0)
    restored_mosaic = isp.cfa.unpack(restored, cfa) if cfg.data.packed else restored
    del restored

    srgb = render_picture(cfg.eval.protocol, restored_mosaic, meta, path)  # rawrestore.protocols: eval's renderer
    picture = srgb[0].permute(1, 2, 0).cpu().numpy()
    del srgb
    dn = written = None
    if out_dng is not None:
        dn = isp.ops.denormalize(restored_mosaic, black, meta.white_level)
        dn = torch.round(dn).clamp_(0.0, float(meta.white_level))[0, 0].cpu().numpy().astype(np.uint16)
        if ratio is None:
            exposure = reference_exposure_s
        else:
            exposure = meta.exposure_time * value if meta.exposure_time else None
        written = dataclasses.replace(meta, width=int(dn.shape[1]), height=int(dn.shape[0]), exposure_time=exposure)

    # both outputs or neither: each goes to a temporary file first; nothing existing is removed on failure
    meta_out = None
    with new_folders([p.parent for p in (out_png, out_dng) if p is not None], "-o/--dng"):
        with atomic_output(out_png, inputs, "-o") as png_tmp:
            write_png(png_tmp, picture, bits=bits)
            if out_dng is not None:
                with atomic_output(out_dng, inputs + [out_png], "--dng") as dng_tmp:
                    meta_out = isp.write_dng(dng_tmp, dn, written)
    return {"ratio": value, "ratio_source": how, "shape": (height, width), "seconds": time.perf_counter() - started,
            "used_ema": used_ema, "step": step, "meta_out": meta_out, "tile": tile_size, "overlap": overlap_size}


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of `rawrestore infer`."""
    parser.description = "Restore one dark RAW file with a trained checkpoint; writes an sRGB PNG and optionally a DNG."
    parser.add_argument("input", metavar="INPUT", help="dark RAW file (ARW, RAF, DNG, ... anything LibRaw reads)")
    parser.add_argument("--checkpoint", required=True, help="a .pt checkpoint (EMA weights are used when present)")
    parser.add_argument("-o", "--out", required=True, help="output PNG")
    parser.add_argument("--dng", default=None, help="also write the restored mosaic as a DNG with the input's metadata")
    parser.add_argument("--ratio", type=float, default=None, help="exposure ratio (default: reference exposure / file's exposure)")
    parser.add_argument("--reference-exposure", type=float, default=DEFAULT_REFERENCE_EXPOSURE_S, metavar="SECONDS",
                        help=f"exposure the output should look like, in seconds (default {DEFAULT_REFERENCE_EXPOSURE_S:g}, SID)")
    parser.add_argument("-c", "--config", default=None, help="config file instead of the one saved in the checkpoint")
    parser.add_argument("--tile", type=int, default=None, help=f"tile side in packed pixels (default eval.tile or {DEFAULT_TILE})")
    parser.add_argument("--overlap", type=int, default=None, help="pixels shared by neighbouring tiles (default eval.overlap or 32)")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. device=cpu")


def run(args: argparse.Namespace) -> int:
    """Restore INPUT; prints what was written."""
    extra = [text for text in args.overrides if "=" not in text]
    if extra:
        raise InputError(f"infer restores one file: INPUT is {args.input}, and '{extra[0][:300]}' is neither an option "
                         "nor a key=value override; run infer once per file")
    cfg = _config_for(args.checkpoint, args.config, args.overrides)
    result = restore_file(args.input, args.checkpoint, args.out, cfg, ratio=args.ratio,
                          reference_exposure_s=args.reference_exposure, out_dng=args.dng, tile=args.tile,
                          overlap=args.overlap, bits=args.bits, other_inputs=(args.config,) if args.config else ())
    height, width = result["shape"]  # type: ignore[misc]
    print(f"infer: {args.input} ({width}x{height}, ratio {result['ratio']:g} from {result['ratio_source']}) -> {args.out}"
          + (f" and {args.dng}" if args.dng else "")
          + f" in {result['seconds']:.1f} s (tiles {result['tile']}, overlap {result['overlap']}, "
          f"{'EMA' if result['used_ema'] else 'raw'} weights of step {result['step']})", file=sys.stdout)
    return 0
