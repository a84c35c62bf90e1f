"""Child process of the fuzz test: runs `isp info` and `isp render` in-process on each file.

Writes one JSON line per run *before* and *after* it, flushed, so the parent can tell which
input killed the process if LibRaw crashes (a crash ends this process, not the test runner).
"""
import contextlib
import io
import json
import sys
from pathlib import Path

from isp.cli import main


def run_one(args):
    err = io.StringIO()
    out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse
            rc = exc.code
        except BaseException as exc:  # an uncaught exception is a finding, not a crash of the harness
            rc = f"uncaught {type(exc).__name__}: {exc}"
    return rc, err.getvalue()


def main_worker(folder: str, log: str) -> None:
    files = sorted(Path(folder).glob("*.dng"))
    with open(log, "a") as fh:
        for path in files:
            for command in ("info", "render"):
                args = [command, str(path)] + (["-o", str(path.with_suffix(".png"))] if command == "render" else [])
                fh.write(json.dumps({"file": path.name, "command": command, "state": "start"}) + "\n")
                fh.flush()
                rc, stderr = run_one(args)
                fh.write(json.dumps({"file": path.name, "command": command, "state": "end", "rc": rc, "stderr": stderr}) + "\n")
                fh.flush()


if __name__ == "__main__":
    main_worker(sys.argv[1], sys.argv[2])
