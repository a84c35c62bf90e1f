"""What `rawrestore eval` and `rawrestore score` write: summary.json, per_image.csv, report.html, the table.

Contract (scripts read it):

    summary.json   {"model"|"baseline"|"classical": {group: stats}   (the `internal` protocol, eval only)
                    "protocols": {protocol: {method: {group: {psnr, ssim, lpips, delta_e00, n}}}},
                    "subset": str, "pairs": int, ...}
    per_image.csv  protocol, method, short, ratio, psnr, ssim, lpips, delta_e00 (one row per image,
                   protocol and method; an unmeasured metric is an empty cell)

With `data.sources` (eval only) the top-level numbers pool every source's images, summary.json adds
"sources": {name: {"model"|"baseline"|"classical": ..., "protocols": ..., "pairs", "camera"}}, and
per_image.csv starts with a `source` column.

Groups are "all" then "x<ratio>" ascending; a metric is null in a group when any image lacks it.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from isp.errors import InputError
from isp.safeio import write_bytes
from rawrestore.metrics import METRIC_NAMES, Evaluator, pooled
from rawrestore.protocols import PUBLISHED

__all__ = ["CSV_COLUMNS", "empty_summary", "protocol_summaries", "pooled_evaluators", "write_per_image_csv", "write_summary",
           "format_protocol_table", "html_tables", "published_rows", "write_report", "check_out_folder", "remove_empty"]

CSV_COLUMNS: tuple[str, ...] = ("protocol", "method", "short", "ratio", "psnr", "ssim", "lpips", "delta_e00")
PUBLISHED_LABEL = "published, not measured here"


def empty_summary(groups: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Groups with every metric null and n = 0 (a method that did not run)."""
    return {group: {**{metric: None for metric in METRIC_NAMES}, "n": 0} for group in groups}


def protocol_summaries(evaluators: dict[str, dict[str, Evaluator]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{protocol: {method: Evaluator}} -> {protocol: {method: summary}}; an empty method gets the groups of its protocol, nulls."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol, methods in evaluators.items():
        ran = {method: ev.summary() for method, ev in methods.items() if len(ev)}
        groups = next(iter(ran.values()), {"all": {}})
        result[protocol] = {method: ran.get(method, empty_summary(groups)) for method in methods}
    return result


def pooled_evaluators(by_source: dict[str, dict[str, dict[str, Evaluator]]]) -> dict[str, dict[str, Evaluator]]:
    """{source: {protocol: {method: Evaluator}}} -> {protocol: {method: every source's rows, named <source>/<short>}}."""
    first = next(iter(by_source.values()))
    return {protocol: {method: pooled({name: parts[protocol][method] for name, parts in by_source.items()})
                       for method in methods} for protocol, methods in first.items()}


def write_per_image_csv(path: Path, evaluators: dict[str, dict[str, Evaluator]],
                        by_source: dict[str, dict[str, dict[str, Evaluator]]] | None = None) -> Path:
    """One CSV row per image, protocol and method (CSV_COLUMNS), atomically. -> path.

    With `by_source` ({source: evaluators}, data.sources) the rows are those, after a `source` column.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    parts = by_source if by_source is not None else {None: evaluators}
    writer.writerow((("source",) if by_source is not None else ()) + CSV_COLUMNS)
    for source, part in parts.items():
        lead = [source] if source is not None else []
        for protocol, methods in part.items():
            for method, evaluator in methods.items():
                for row in evaluator.rows:
                    writer.writerow(lead + [protocol, method, row.name, repr(row.ratio)]
                                    + ["" if getattr(row, m) is None else repr(getattr(row, m)) for m in METRIC_NAMES])
    return write_bytes(path, buffer.getvalue().encode("utf-8"))


def write_summary(path: Path, summary: dict[str, Any]) -> Path:
    """summary.json, atomically. -> path."""
    return write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))


def _cell(stats: dict[str, Any], key: str, digits: int) -> str | None:
    value = stats.get(key)
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else None


_COLUMNS = (("psnr", 2), ("ssim", 4), ("lpips", 4), ("delta_e00", 2))


def format_protocol_table(protocols: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The printed table: one block per protocol and group, a row per method; '-' where not measured."""
    lines = [f"{'protocol':<9} {'group':<6} {'method':<10} {'PSNR dB':>8} {'SSIM':>7} {'LPIPS':>7} {'dE00':>7} {'n':>4}"]
    for protocol, methods in protocols.items():
        groups = list(next(iter(methods.values()), {}))
        for group in groups:
            for index, (method, summary) in enumerate(methods.items()):
                stats = summary.get(group, {})
                cells = [f"{_cell(stats, key, digits) or '-':>{width}}"
                         for (key, digits), width in zip(_COLUMNS, (8, 7, 7, 7))]
                lines.append(f"{protocol if index == 0 else '':<9} {group if index == 0 else '':<6} {method:<10} "
                             f"{' '.join(cells)} {stats.get('n', 0):>4}")
    return "\n".join(lines)


def html_tables(protocols: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One HTML table per protocol: rows group x method."""
    parts = []
    head = "<tr><th>group</th><th>method</th><th>PSNR (dB)</th><th>SSIM</th><th>LPIPS</th><th>ΔE00</th><th>n</th></tr>"
    for protocol, methods in protocols.items():
        groups = list(next(iter(methods.values()), {}))
        rows = []
        for group in groups:
            for method, summary in methods.items():
                stats = summary.get(group, {})
                cells = "".join(f"<td>{_cell(stats, key, digits) or '–'}</td>" for key, digits in _COLUMNS)
                rows.append(f"<tr><td>{html.escape(group)}</td><td>{html.escape(method)}</td>{cells}"
                            f"<td>{stats.get('n', 0)}</td></tr>")
        parts.append(f"<h3>protocol <code>{html.escape(protocol)}</code></h3><table>{head}{''.join(rows)}</table>")
    return "".join(parts)


def published_rows(camera: str, protocols: Iterable[str]) -> list[dict[str, Any]]:
    """Published figures for this camera under the protocols that were measured."""
    wanted = set(protocols)
    return [row for row in PUBLISHED if row["camera"] == camera and row["protocol"] in wanted]


def _published_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(r['protocol'])}</td><td>{html.escape(r['subset'])}</td><td>{html.escape(r['group'])}</td>"
        f"<td>{r['psnr']:.2f}</td><td>{r['ssim']:.4f}</td><td>{html.escape(r['source'])}</td></tr>" for r in rows)
    return (f"<h2>Published figures ({PUBLISHED_LABEL})</h2><p>For comparison only: the authors' models on the real SID "
            "test set; compare with a row above only when the protocol, subset and data match.</p><table><tr>"
            "<th>protocol</th><th>subset</th><th>group</th><th>PSNR (dB)</th><th>SSIM</th><th>source</th></tr>"
            f"{body}</table>")


def write_report(out: Path, protocols: dict[str, dict[str, dict[str, Any]]], camera: str | tuple[str, ...],
                 images: list[dict[str, Any]], notes: list[str], curves: str | None, title: str,
                 pictures: tuple[tuple[str, str], ...] = (),
                 sources: dict[str, dict[str, dict[str, dict[str, Any]]]] | None = None) -> Path:
    """DIR/report.html: notes, per-protocol tables (and per source), published figures, curves, pictures per image.

    `camera` is one camera or the cameras of data.sources (published figures of each);
    `sources` ({source: {protocol: {method: summary}}}) adds one set of tables per source.
    """
    cameras = (camera,) if isinstance(camera, str) else tuple(dict.fromkeys(camera))
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
             "figure{display:inline-block;margin:4px;text-align:center}img{max-width:260px}"
             "figcaption{font-size:12px}.row{margin-bottom:1.2em}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    heading = "All sources, per protocol and exposure ratio" if sources else "Per protocol and exposure ratio"
    parts.append(f"<h2>{heading}</h2>" + html_tables(protocols))
    for name, tables in (sources or {}).items():
        parts.append(f"<h2>Source <code>{html.escape(name)}</code></h2>" + html_tables(tables))
    parts.append(_published_table([row for one in cameras for row in published_rows(one, protocols)]))
    if curves:
        parts.append(f"<h2>Training curves</h2><img style='max-width:900px' src='{html.escape(curves)}'>")
    if images:
        parts.append("<h2>Images</h2><p>" + " · ".join(html.escape(caption) for _, caption in pictures) + "</p>")
    for item in images:
        figures = [f"<figure><a href='{html.escape(item[key])}'><img src='{html.escape(item[key])}'></a>"
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>" for key, caption in pictures if item.get(key)]
        parts.append(f"<div class='row'><h3>{html.escape(item['name'])} (x{item['ratio']:g})</h3>"
                     f"<p>{html.escape(item.get('scores', ''))}</p>{''.join(figures)}</div>")
    parts.append("</body></html>")
    path = out / "report.html"
    write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path


def check_out_folder(out: Path, what: str = "--out") -> list[Path]:
    """Create the output folder (and parents) if needed. -> folders created, outermost first; InputError when impossible."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"{what} {out} exists and is not a folder; name a folder (new or existing)")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{what} {out}: folder is not writable; choose another output folder")
        return []
    missing = []
    folder = out
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{what} {out}: {folder} is not a folder; choose another output path")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as exc:
            remove_empty(created)
            raise InputError(f"{what} {out}: cannot create {path} ({exc.strerror or exc}); choose another output path") from None
        created.append(path)
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove folders this command created that are still empty, innermost first."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return
