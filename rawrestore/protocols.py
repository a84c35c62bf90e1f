"""Evaluation protocols: how a prediction and its ground truth become the two images a metric compares.

    internal  our ISP on both sides (`eval_renderer`: bilinear demosaic, sRGB curve), the packed
              prediction against the packed long exposure; what training validates with.
    sid       SID's sRGB protocol (Chen et al., CVPR 2018, test_Sony.py): the target is
              `rawpy.postprocess(**SID_POSTPROCESS)` of the long exposure (LibRaw defaults: AHD, or
              its X-Trans demosaic for Fuji; BT.709 curve; sRGB), the prediction is the same call on the
              predicted mosaic put back into the long exposure's container (its DN, clipped to the
              sensor's range, replace the long file's raw pixels), so both pass one ISP with one
              metadata set.
    raw       the ELD / PMN protocol: PSNR and SSIM (scikit-image's default 7x7 window) on the
              packed, black-subtracted, white-normalised RAW clipped to [0, 1]; no LPIPS or dE00.

`score_internal` is the one scoring path of `rawrestore eval` and `Trainer.validate`: both
predict with `predict` and render with `eval_renderer`, so they cannot disagree.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

import isp
from isp.errors import InputError
from rawrestore.ensemble import restore
from rawrestore.metrics import Evaluator, ImageRow, functional

__all__ = [
    "PROTOCOLS", "SID_POSTPROCESS", "PUBLISHED", "parse_protocols", "lpips_or_none", "eval_renderer", "predict", "render_internal", "score_internal",
    "libraw_render", "render_picture", "to_tensor", "SidRenderer", "prediction_dn", "score_raw", "raw_row",
]

PROTOCOLS: tuple[str, ...] = ("internal", "sid", "raw")
# SID's ground-truth call (test_Sony.py / test_Fuji.py); every other LibRaw setting stays at its default.
SID_POSTPROCESS: dict[str, Any] = {"use_camera_wb": True, "half_size": False, "no_auto_bright": True, "output_bps": 16}

# Published figures shown beside measured ones in the reports: never measured here.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"source": "SID (Chen et al., CVPR 2018), Table 1", "protocol": "sid", "camera": "sony", "subset": "all",
     "group": "all", "psnr": 28.88, "ssim": 0.787},
    {"source": "SID (Chen et al., CVPR 2018), Table 1", "protocol": "sid", "camera": "fuji", "subset": "all",
     "group": "all", "psnr": 26.61, "ssim": 0.680},
    {"source": "PMN (Feng et al., TPAMI 2023), SID Sony", "protocol": "raw", "camera": "sony", "subset": "burst00",
     "group": "x100", "psnr": 43.47, "ssim": 0.9606},
    {"source": "PMN (Feng et al., TPAMI 2023), SID Sony", "protocol": "raw", "camera": "sony", "subset": "burst00",
     "group": "x250", "psnr": 41.04, "ssim": 0.9471},
    {"source": "PMN (Feng et al., TPAMI 2023), SID Sony", "protocol": "raw", "camera": "sony", "subset": "burst00",
     "group": "x300", "psnr": 37.87, "ssim": 0.9344},
)


def parse_protocols(text: str) -> list[str]:
    """'internal,sid' -> ['internal', 'sid']; InputError naming an unknown protocol."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise InputError(f"--protocol {text!r}: expected a comma-separated list of {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(names))


def lpips_or_none(net: str = "alex", weights: str | None = None,
                  device: torch.device | str = "cpu") -> tuple[nn.Module | None, str]:
    """LPIPS metric network when its backbone weights are on disk. -> (module or None, one-line note)."""
    from rawrestore.errors import WeightsError

    try:
        from rawrestore.pretrained import build_lpips

        module = build_lpips(net, weights)
    except (WeightsError, ImportError) as error:
        return None, f"LPIPS reported as null: {str(error).splitlines()[0]}"
    return module.to(device), f"LPIPS ({net}) on"


# ---------------------------------------------------------------------------- internal


def eval_renderer() -> isp.ISP:
    """The one renderer of scores and output pictures: bilinear demosaic, sRGB curve."""
    return isp.ISP(demosaic="bilinear", gamma="srgb")


@torch.no_grad()
def predict(model: nn.Module, sample: dict[str, Any], eval_cfg: Any, packed: bool, device: torch.device) -> torch.Tensor:
    """The model's output for one sample, float32, per eval.tile / overlap / self_ensemble. -> (1,C,h,w)."""
    packed_input = sample["input"][None].to(device)
    return restore(model, packed_input, sample["cfa"].to(device), eval_cfg.tile, eval_cfg.overlap,
                   eval_cfg.self_ensemble, packed).float()


def render_internal(renderer: isp.ISP, raw: torch.Tensor, sample: dict[str, Any], packed: bool) -> torch.Tensor:
    """sRGB of one sample's RAW through `renderer` with the long exposure's metadata. raw (1,C,h,w) -> (1,3,H,W)."""
    device = raw.device
    return renderer(raw.float(), sample["cfa"].to(device), sample["wb"].to(device), sample["cam_to_srgb"].to(device),
                    packed=packed)


@torch.no_grad()
def score_internal(evaluator: Evaluator, renderer: isp.ISP, pred: torch.Tensor, sample: dict[str, Any],
                   packed: bool) -> tuple[ImageRow, torch.Tensor, torch.Tensor]:
    """Score a prediction under `internal` and record it. pred (1,C,h,w) -> (row, pred sRGB, target sRGB)."""
    target = sample["target"][None].to(pred.device)
    pred_srgb = render_internal(renderer, pred, sample, packed)
    target_srgb = render_internal(renderer, target, sample, packed)
    row = evaluator.update([sample["short_name"]], [float(sample["ratio"])], pred_srgb, target_srgb)[0]
    return row, pred_srgb, target_srgb


# --------------------------------------------------------------------------------- sid


def _unflip(image: np.ndarray, flip: int) -> np.ndarray:
    """Undo LibRaw's output orientation so rows/columns follow the raw frame. (H,W,3) -> (h,w,3)."""
    if flip == 3:
        return image[::-1, ::-1]
    if flip == 5:  # LibRaw turned it 90 degrees counter-clockwise
        return np.rot90(image, -1)
    if flip == 6:  # 90 degrees clockwise
        return np.rot90(image, 1)
    return image


def libraw_render(path: str | os.PathLike, mosaic_dn: np.ndarray | None = None,
                  box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """SID's rendering of a RAW file, optionally with other raw pixels. -> (h,w,3) float64 in [0,1].

    mosaic_dn (h,w) DN replaces the file's visible raw pixels inside `box` (top, left, h, w; the
    whole visible frame when None) before `rawpy.postprocess(**SID_POSTPROCESS)`; the result is
    cut to `box` in raw-frame orientation. Equal to rendering a DNG that carries the file's
    metadata and those pixels (tests/test_protocols.py checks it), without writing one.
    """
    import rawpy

    try:
        raw = rawpy.imread(str(path))
    except (rawpy.LibRawError, OSError) as exc:
        raise InputError(f"{path}: LibRaw cannot read it ({type(exc).__name__}); check the dataset files") from None
    with raw:
        sizes = raw.sizes
        if box is None:
            box = (0, 0, sizes.height, sizes.width)
        top, left, height, width = box
        if top < 0 or left < 0 or top + height > sizes.height or left + width > sizes.width:
            raise InputError(f"{path}: box {box} is outside the {sizes.width}x{sizes.height} frame")
        if mosaic_dn is not None:
            if raw.raw_image is None or np.ndim(raw.raw_image) != 2:
                raise InputError(f"{path}: not a colour-filter-array RAW (no mosaic to put a prediction into)")
            if mosaic_dn.shape != (height, width):
                raise InputError(f"{path}: prediction {mosaic_dn.shape} does not fill the box {height}x{width}")
            limit = float(raw.white_level)
            # the long file's raw buffer is LibRaw's own copy: writing into it changes nothing on disk
            rows = slice(sizes.top_margin + top, sizes.top_margin + top + height)
            cols = slice(sizes.left_margin + left, sizes.left_margin + left + width)
            raw.raw_image[rows, cols] = np.clip(np.round(mosaic_dn), 0.0, limit).astype(np.uint16)
        try:
            rendered = raw.postprocess(**SID_POSTPROCESS)
        except rawpy.LibRawError as exc:
            raise InputError(f"{path}: LibRaw cannot render it ({type(exc).__name__}: {exc})") from None
        image = _unflip(rendered, sizes.flip)
    if image.shape[:2] != (sizes.height, sizes.width):
        raise InputError(f"{path}: LibRaw's render is {image.shape[1]}x{image.shape[0]}, not the "
                         f"{sizes.width}x{sizes.height} raw frame; this camera cannot be scored under 'sid'")
    crop = image[top:top + height, left:left + width]
    return crop.astype(np.float64) / 65535.0


def prediction_dn(pred: torch.Tensor, sample: dict[str, Any], packed: bool) -> np.ndarray:
    """A normalised prediction back in the long file's DN. pred (1,C,h,w) -> (H,W) float64 (not yet rounded)."""
    cfa = sample["cfa"].to(pred.device)
    mosaic = isp.cfa.unpack(pred.float(), cfa) if packed else pred.float()
    black = sample["black_level"].to(pred.device, torch.float64)
    white = float(sample["white_level"])
    dn = isp.ops.denormalize(mosaic.double().clamp(0.0, 1.0), black, white)
    return dn[0, 0].cpu().numpy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) float in [0,1] -> (1,3,H,W) float32, as eval's other renders (metrics accumulate in float64)."""
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]



class SidRenderer:
    """SID-protocol renders of a dataset's pairs; keeps the last long exposure's target (shared by its short ones).

    Renders are float32 (tests agree with float64 scikit-image to 1e-6); float64 metrics took 2-3x the time.
    """

    def __init__(self) -> None:
        self._key: tuple[str, tuple[int, ...]] | None = None
        self._target: torch.Tensor | None = None

    def target(self, long_path: str | os.PathLike, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Ground truth of a long exposure: SID's call, cut to box. -> (1,3,h,w) float32."""
        key = (str(long_path), tuple(box) if box is not None else ())
        if key != self._key:
            self._target = to_tensor(libraw_render(long_path, None, box))
            self._key = key
        return self._target  # type: ignore[return-value]

    def prediction(self, long_path: str | os.PathLike, pred: torch.Tensor, sample: dict[str, Any], packed: bool,
                   box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """The prediction through the same LibRaw call in the long file's container. -> (1,3,h,w) float32."""
        return to_tensor(libraw_render(long_path, prediction_dn(pred, sample, packed), box))


def render_picture(protocols: list[str], mosaic: torch.Tensor, meta: isp.CameraMeta,
                   path: str | os.PathLike) -> torch.Tensor:
    """`rawrestore infer`'s picture of a restored mosaic. mosaic (1,1,H,W) normalised with `meta` -> (1,3,H,W).

    SID's LibRaw call in the input file's container when the first sRGB protocol of eval.protocol
    is `sid` (so `rawrestore score --protocol sid` scores it as eval does), else `eval_renderer`.
    """
    srgb_protocols = [name for name in protocols if name != "raw"]
    if srgb_protocols[:1] == ["sid"]:
        height, width = mosaic.shape[-2:]
        black = torch.tensor(meta.black_level, dtype=torch.float64, device=mosaic.device)
        dn = isp.ops.denormalize(mosaic.double().clamp(0.0, 1.0), black, float(meta.white_level))[0, 0].cpu().numpy()
        return to_tensor(libraw_render(path, dn, (0, 0, height, width))).to(mosaic.device)
    tensors = meta.render_tensors(mosaic.device)
    return eval_renderer()(mosaic, tensors["cfa"], tensors["wb"], tensors["cam_to_srgb"])


# --------------------------------------------------------------------------------- raw


def _packed(raw: torch.Tensor, cfa: torch.Tensor, packed: bool) -> torch.Tensor:
    return raw if packed else isp.cfa.pack(raw, cfa)


def raw_row(name: str, ratio: float, pred_packed: torch.Tensor, target_packed: torch.Tensor) -> ImageRow:
    """ELD/PMN raw-domain scores of one packed pair (both clipped to [0,1]). -> ImageRow without LPIPS/dE00."""
    pred32, target32 = pred_packed.float(), target_packed.float()
    return ImageRow(name=name, ratio=float(ratio), psnr=float(functional.raw_psnr(pred32, target32)[0]),
                    ssim=float(functional.raw_ssim(pred32, target32)[0]))


def score_raw(evaluator: Evaluator, pred: torch.Tensor, sample: dict[str, Any], packed: bool) -> ImageRow:
    """Score a prediction under `raw` and record it. pred (1,C,h,w) -> the row."""
    cfa = sample["cfa"].to(pred.device)
    target = _packed(sample["target"][None].to(pred.device), cfa, packed)
    row = raw_row(sample["short_name"], float(sample["ratio"]), _packed(pred, cfa, packed), target)
    return evaluator.add(row.name, row.ratio, row.psnr, row.ssim)

