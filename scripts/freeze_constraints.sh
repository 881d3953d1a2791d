#!/usr/bin/env bash
# Writes constraints.txt: the exact versions installed now of everything megatron_most[dev]
# needs (its dependency closure, read from the installed metadata; other packages of this
# environment are left out), which `bash scripts/setup.sh` then installs on every fresh
# machine. Run it after the suite passed against the newest releases:
#   bash scripts/setup.sh --latest && python -m pytest && bash scripts/freeze_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins, todo = {}, [("megatron_most", {"dev"})]
while todo:
    name, extras = todo.pop()
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:  # an optional dependency not installed here
        continue
    key = canonicalize_name(dist.metadata["Name"])
    if key in pins and extras <= pins[key][1]:
        continue
    pins[key] = (f"{dist.metadata['Name']}=={dist.version.split('+')[0]}", extras | pins.get(key, ("", set()))[1])
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            todo.append((req.name, set(req.extras)))
pins.pop("megatron-most")
lines = sorted((pin for pin, _ in pins.values()), key=str.lower)
header = [
    "# Exact versions the test suite last passed with (bash scripts/freeze_constraints.sh).",
    "# setup.py keeps ranges; scripts/setup.sh installs with -c constraints.txt.",
]
open("constraints.txt", "w").write("\n".join(header + lines) + "\n")
print(f"wrote constraints.txt ({len(lines)} packages)")
PY
