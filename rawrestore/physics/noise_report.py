"""HTML report of a noise calibration: the plots that show whether it is believable.

`write_report(calibration, folder)` writes `folder/index.html` and its PNGs:

- `ptc_iso<N>.png`: photon transfer per colour, variance against mean above black of every flat
  pair, with the fitted line (slope K). Points off the line mean uneven light or clipping.
- `ppcc_iso<N>.png`: the Tukey-lambda probability-plot correlation against lambda, the maximum
  marked. A flat curve means the shape is poorly determined (too few dark pixels).
- `residual_iso<N>.png`: histogram of the read-noise residuals (log counts) with the fitted
  Tukey-lambda and Gaussian densities (quantisation included). Heavy tails above the Gaussian
  are what the Tukey fit is for.
- `lines.png`: log(scale) against log(K) per ISO for the Tukey, Gaussian and row scales with
  the fitted lines ELD samples from.
"""
from __future__ import annotations

import html
import io
import math
from pathlib import Path

import numpy as np

from isp.safeio import check_output, write_bytes
from rawrestore.errors import InputError
from rawrestore.physics.noise_calibration import COLOUR_SLOTS, Calibration, IsoCalibration

__all__ = ["check_report_dir", "write_report", "REPORT_PAGE"]

REPORT_PAGE = "index.html"
_OWN_NAMES = ("index.html", "lines.png", "ptc_iso", "ppcc_iso", "residual_iso")
_SLOT_COLOURS = ("tab:red", "tab:green", "tab:blue", "darkolivegreen")


def check_report_dir(folder: str) -> Path:
    """The report folder: new, empty, or holding only a previous report's files; InputError otherwise."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"--report {folder} is a file; give a folder for the report (it is created if missing)")
    if path.is_dir():
        foreign = [p.name for p in path.iterdir() if not p.name.startswith(_OWN_NAMES)]
        if foreign:
            raise InputError(f"--report {folder} holds files this command did not write (e.g. {foreign[0]}); "
                             "choose a new or empty folder")
    return path


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _axes(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (5, 3.6)):
    """A new figure with one labelled axis. -> (figure, axis)."""
    from matplotlib.figure import Figure  # its own Agg canvas: no global backend, nothing to close

    figure = Figure(figsize=size)
    axis = figure.add_subplot()
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    return figure, axis


def _ptc_figure(c: IsoCalibration):
    figure, axis = _axes(f"photon transfer, ISO {c.iso:g}", "mean above black (DN)", "variance (DN$^2$)")
    flats = c.flats
    top = 0.0
    for slot, name in enumerate(COLOUR_SLOTS):
        if not (flats.slots == slot).any():
            continue
        means, variances = flats.points(slot)
        top = max(top, float(means.max()))
        axis.plot(means, variances, "o", color=_SLOT_COLOURS[slot], label=f"{name}: K {c.K_per_colour[slot]:.4g}")
    line = np.linspace(0.0, top * 1.05, 50)
    axis.plot(line, c.K * line + c.photon_transfer_intercept, "k-", lw=1, label=f"fit: K {c.K:.4g} DN/e-")
    axis.legend(fontsize=7)
    return figure


def _ppcc_figure(c: IsoCalibration):
    figure, axis = _axes(f"read-noise shape, ISO {c.iso:g}", "Tukey lambda", "probability-plot correlation")
    lams, ppcc = c.ppcc_curve
    axis.plot(lams, ppcc, "-", color="tab:blue")
    axis.axvline(c.tukey_lambda, color="k", lw=1, ls="--", label=f"max at lambda {c.tukey_lambda:+.3f} (r {c.ppcc_max:.5f})")
    axis.axvline(0.14, color="tab:gray", lw=1, ls=":", label="0.14: close to Gaussian")
    axis.legend(fontsize=7)
    return figure


def _residual_figure(c: IsoCalibration):
    from scipy import stats

    figure, axis = _axes(f"read noise, ISO {c.iso:g} (quantisation included)", "read-noise residual (DN)", "density")
    residuals = c.residuals
    spread = float(np.quantile(np.abs(residuals), 0.9995)) if residuals.size else 1.0
    edges = np.linspace(-spread, spread, 121)
    axis.hist(residuals, bins=edges, density=True, color="0.75", label=f"residuals ({residuals.size})")
    grid = 0.5 * (edges[1:] + edges[:-1])
    q = c.quant_step
    quant = q * q / 12.0
    scale = math.sqrt(c.tukey_scale ** 2 + quant / max(_unit_variance(c.tukey_lambda), 1e-12)) if c.tukey_scale > 0 else 1.0
    axis.plot(grid, stats.tukeylambda.pdf(grid, c.tukey_lambda, scale=scale), "k-", lw=1,
              label=f"Tukey lambda {c.tukey_lambda:+.3f}, scale {c.tukey_scale:.3f}")
    axis.plot(grid, stats.norm.pdf(grid, scale=math.sqrt(c.gauss_sigma ** 2 + quant)), "--", color="tab:orange", lw=1,
              label=f"Gaussian sigma {c.gauss_sigma:.3f}")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    return figure


def _unit_variance(lam: float) -> float:
    from rawrestore.physics.noise import tukey_lambda_variance

    return tukey_lambda_variance(lam)


def _lines_figure(calibration: Calibration):
    figure, axis = _axes("fits across ISOs (ELD layout)", "log K (DN per electron)", "log scale (DN)", (5.5, 4))
    gains = np.array([c.K for c in calibration.per_iso])
    lines = calibration.lines()
    grid = np.linspace(np.log(gains.min()) - 0.2, np.log(gains.max()) + 0.2, 20)
    for key, attr, colour in (("G_scale", "tukey_scale", "tab:blue"), ("g_scale", "gauss_sigma", "tab:orange"),
                              ("R_scale", "row_scale", "tab:red")):
        values = np.maximum([getattr(c, attr) for c in calibration.per_iso], 1e-3)
        fit = lines[key]
        axis.plot(np.log(gains), np.log(values), "o", color=colour)
        axis.plot(grid, fit["slope"] * grid + fit["bias"], "-", color=colour,
                  label=f"{key} ({attr}): slope {fit['slope']:.3f}, sigma {fit['sigma']:.3f}")
    axis.legend(fontsize=7)
    return figure


def write_report(calibration: Calibration, folder: str | Path) -> Path:
    """Write the report's PNGs and index.html into `folder` (created if missing). -> path of index.html."""
    folder = check_report_dir(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    check_output(folder / REPORT_PAGE, what="--report page")
    rows, figures = [], []
    for c in calibration.per_iso:
        tag = f"iso{c.iso:g}"
        for prefix, make in (("ptc", _ptc_figure), ("ppcc", _ppcc_figure), ("residual", _residual_figure)):
            write_bytes(folder / f"{prefix}_{tag}.png", _png(make(c)), what="--report image")
        figures.append(f"<h3>ISO {c.iso:g}</h3><p>" + "".join(
            f'<img src="{p}_{tag}.png" alt="{p} ISO {c.iso:g}">' for p in ("ptc", "ppcc", "residual")) + "</p>")
        rows.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in (
            f"{c.iso:g}", f"{c.K:.4g}", " / ".join(f"{k:.4g}" for k in c.K_per_colour), " / ".join(f"{b:.2f}" for b in c.black),
            f"{c.tukey_lambda:+.3f}", f"{c.tukey_scale:.3f}", f"{c.gauss_sigma:.3f}", f"{c.row_scale:.3f}",
            f"{c.quant_step:g}", f"{c.dark_frames} / {c.flat_pairs}")) + "</tr>")
    write_bytes(folder / "lines.png", _png(_lines_figure(calibration)), what="--report image")
    lines = calibration.lines()
    fit_rows = "".join(f"<tr><td>{k}</td><td>{v['slope']:.4f}</td><td>{v['bias']:.4f}</td><td>{v['sigma']:.4f}</td></tr>"
                       for k, v in lines.items())
    title = html.escape(f"Noise calibration: {calibration.make} {calibration.model}")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td,th{{padding:2px 8px;text-align:right}} img{{margin:4px}}</style></head>
<body><h1>{title}</h1>
<p>{calibration.width}x{calibration.height}, white level {calibration.white_level:g}. All values in DN above the
metadata black level; K in DN per electron. Believable when: the photon-transfer points of every colour lie on
one line through (0, read variance); the PPCC curve has a clear maximum; the histogram follows the fitted density
into the tails; the scales grow smoothly with K.</p>
<table><tr><th>ISO</th><th>K</th><th>K per colour (R/G/B/G2)</th><th>black (R/G/B/G2)</th><th>Tukey lambda</th>
<th>Tukey scale</th><th>Gaussian sigma</th><th>row scale</th><th>quant step</th><th>darks / flat pairs</th></tr>
{''.join(rows)}</table>
<h2>Fits across ISOs: log(scale) = slope log(K) + bias</h2>
<table><tr><th>scale</th><th>slope</th><th>bias</th><th>sigma</th></tr>{fit_rows}</table>
<p><img src="lines.png" alt="fits across ISOs"></p>
<h2>Per ISO: photon transfer, Tukey-lambda PPCC, read-noise residuals</h2>
{''.join(figures)}
</body></html>
"""
    write_bytes(folder / REPORT_PAGE, page.encode("utf-8"), what="--report page")
    return folder / REPORT_PAGE
