"""Write a converted checkpoint so that it is either complete or absent.

Both conversion directions write into `.<out>.partial-<pid>` next to `--out` and rename it at
the end; on any error the partial directory is removed, so a half-written checkpoint never
looks complete. An existing non-empty `--out` is refused before any work starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

_CHECKPOINT_MARKERS = ("metadata.json", ".metadata", "config.json", "model.safetensors.index.json")


def check_output(out_dir: Path) -> None:
    """Raise FileExistsError unless `out_dir` is absent or an empty directory."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    if any((out_dir / marker).exists() for marker in _CHECKPOINT_MARKERS):
        raise FileExistsError(
            f"--out {out_dir} already holds a checkpoint and is not empty: refusing to overwrite it "
            "(remove it or choose another --out)"
        )
    if any(out_dir.iterdir()):
        raise FileExistsError(
            f"--out {out_dir} exists and is not empty: refusing to write into it (remove it or choose another --out)"
        )


@contextlib.contextmanager
def atomic_output(out_dir: Path):
    """Yield a fresh temporary directory next to `out_dir`; rename it to `out_dir` on success."""
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output(out_dir)  # nothing appeared there meanwhile
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked): the rename replaces it
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
