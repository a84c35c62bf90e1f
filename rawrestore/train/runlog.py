"""The run log: `log.jsonl` records (one per logging step, validation, end), their plots, one-line summaries.

`log.jsonl` is append-only and flushed per record, so a kill loses at most a torn last line
(`read_log` skips it). A resumed run cuts the log back to its checkpoint's step
(`truncate_log`); a fresh run starts an empty one. A write that fails (full disk, read-only
folder) is one `TrainingError` line naming the file.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from isp.safeio import atomic_output, check_output
from rawrestore.errors import InputError

__all__ = ["LOG_NAME", "CURVES_NAME", "TrainingError", "read_log", "write_loss_curves", "JsonlLog", "truncate_log",
           "format_groups", "open_tensorboard", "report_step", "plot_curves"]

_log = logging.getLogger("rawrestore.train")

LOG_NAME = "log.jsonl"
CURVES_NAME = "loss_curves.png"


class TrainingError(InputError):
    """Training cannot go on (e.g. too many non-finite losses in a row); one line saying why and what to try."""


def _write_error(path: Path, error: OSError) -> TrainingError:
    """An OSError while writing `path` -> one line naming it and what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainingError(f"{path}: disk full while writing the run log; free space, then rerun with --resume auto")
    return TrainingError(f"{path}: cannot write the run log ({error.strerror or error}); check the folder's permissions")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL log; a torn last line (killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class JsonlLog:
    """Append-only JSONL writer (rank 0); each record is flushed so a kill loses at most a torn last line."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.handle = None
        if enabled:
            check_output(path, what="run log")  # a regular file or a new path: never a device, FIFO or symlink
            try:
                self.handle = open(path, "a", encoding="utf-8")
            except OSError as error:
                raise _write_error(path, error) from None

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is None:
            return
        try:
            self.handle.write(json.dumps(record, allow_nan=True) + "\n")
            self.handle.flush()
        except OSError as error:
            self.close()
            raise _write_error(self.path, error) from None

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            try:
                handle.close()
            except OSError:  # the flush at close hit the same full disk: the error was reported by write
                pass


def truncate_log(path: Path, step: int) -> None:
    """Keep only records up to `step` (a resumed run redoes the steps after its checkpoint; step 0: a fresh log).

    Written to a temporary file then renamed, so a failure (full disk) leaves the log as it was
    and no temporary file behind.
    """
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if int(r.get("step", 0)) <= step and r.get("event") != "end"]
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    except OSError as error:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _write_error(path, error) from None


def _smooth(values: list[float], span: int) -> np.ndarray:
    """Moving average over `span` points (shorter at the start). -> (N,)."""
    data = np.asarray(values, dtype=np.float64)
    if span <= 1 or data.size < 2:
        return data
    cumulative = np.cumsum(np.insert(data, 0, 0.0))
    out = np.empty_like(data)
    for i in range(data.size):
        lo = max(0, i + 1 - span)
        out[i] = (cumulative[i + 1] - cumulative[lo]) / (i + 1 - lo)
    return out


def write_loss_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Plot training curves from a log.jsonl: total and per-term losses, effective weights, lr, val PSNR. -> PNG path or None."""
    records = read_log(log_path)
    steps = [r for r in records if "loss" in r and not r.get("skipped")]
    if not steps:
        return None
    from matplotlib.figure import Figure  # a Figure with its own Agg canvas: no global backend to set

    x = [r["step"] for r in steps]
    span = max(1, len(x) // 50)
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    ax.plot(x, [r["loss"] for r in steps], color="0.8", lw=0.7)
    ax.plot(x, _smooth([r["loss"] for r in steps], span), color="k", lw=1.5, label="total")
    ax.set_title("total loss (weighted)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax = axes[0, 1]
    names = list(steps[-1].get("terms", {}))
    for name in names:
        values = [r["terms"][name]["value"] for r in steps if name in r.get("terms", {})]
        term_steps = [r["step"] for r in steps if name in r.get("terms", {})]
        ax.plot(term_steps, _smooth(values, span), lw=1.2, label=name)
    ax.set_title("loss terms (raw values)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    if names:
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(x, [r["lr"] for r in steps], color="tab:blue", label="lr")
    ax.set_title("learning rate and term weights")
    ax.set_xlabel("step")
    ax.set_ylabel("lr")
    twin = ax.twinx()
    twin.set_ylabel("effective weight")
    for name in names:  # per-scale values (`raw_l1@1/2`) have no weight of their own
        points = [(r["step"], r["terms"][name]["weight"]) for r in steps
                  if name in r.get("terms", {}) and r["terms"][name]["weight"] is not None]
        if points:
            twin.plot(*zip(*points), lw=0.8, ls="--", label=f"w {name}")
    if names:
        twin.legend(fontsize=7, loc="center right")
    ax = axes[1, 1]
    val = [r for r in records if "val" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val"]["all"]["psnr"] for r in val], "o-", color="tab:green")
        ax.set_title("validation PSNR (dB, sRGB)")
    else:
        ax.set_title("validation PSNR (none yet)")
    ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_output(png_path, what="loss curves") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return Path(png_path)


def plot_curves(output_dir: Path, report: Callable[[str], None]) -> Path | None:
    """output_dir/loss_curves.png from its log.jsonl; a plotting failure is one reported line, never an error."""
    try:
        return write_loss_curves(Path(output_dir) / LOG_NAME, Path(output_dir) / CURVES_NAME)
    except Exception as error:  # plotting must never lose a finished run
        report(f"train: loss curves not written ({type(error).__name__}: {error})")
        return None


def format_groups(summary: dict[str, dict[str, Any]]) -> str:
    """'all 25.31 dB / 0.812 / dE 5.2 (n=6) | x100 ...' for one-line progress output."""
    parts = []
    for group, stats in summary.items():
        psnr = stats.get("psnr")
        ssim = stats.get("ssim")
        delta = stats.get("delta_e00")
        text = f"{group} " + (f"{psnr:.2f} dB" if psnr is not None else "- dB")
        text += f" / SSIM {ssim:.3f}" if ssim is not None else ""
        text += f" / dE00 {delta:.2f}" if delta is not None else ""
        parts.append(f"{text} (n={stats.get('n')})")
    return " | ".join(parts)


def open_tensorboard(output_dir: Path) -> Any:
    """A TensorBoard SummaryWriter in output_dir/tensorboard, or None (with one log line) when it is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _log.info("train: TensorBoard not installed (pip install tensorboard); logging to log.jsonl only")
        return None
    return SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))


def report_step(record: dict[str, Any], step: int, bar: Any, board: Any, info: Callable[[str], None]) -> None:
    """A logged step on the progress bar, TensorBoard and (skipped steps) one line."""
    if record.get("skipped"):
        info(f"step {step}: skipped ({record['reason']}; {record['nonfinite_in_row']} in a row, "
             f"{record['skipped_steps']} in all)")
    if bar is not None:
        bar.update(step - bar.n)
        if "loss" in record:
            postfix = {"loss": f"{record['loss']:.4g}"}
            postfix.update({n: f"{t['value']:.3g}" for n, t in record["terms"].items()})
            if "gan/d_acc" in record:
                postfix["D acc"] = f"{record['gan/d_acc']:.2f}"
            postfix["lr"] = f"{record['lr']:.2e}"
            bar.set_postfix(postfix, refresh=False)
    if board is not None and "loss" in record:
        board.add_scalar("train/loss", record["loss"], step)
        board.add_scalar("train/lr", record["lr"], step)
        for name, term in record["terms"].items():
            board.add_scalar(f"loss/{name}", term["value"], step)
            if term["weight"] is not None:
                board.add_scalar(f"weight/{name}", term["weight"], step)
        for key in ("gan/d_loss", "gan/d_acc"):  # the discriminator's, after loss.gan.warmup
            if key in record:
                board.add_scalar(key, record[key], step)
