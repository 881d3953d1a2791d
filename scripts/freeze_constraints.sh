#!/usr/bin/env bash
# Writes constraints.txt: the exact versions installed now, which `bash scripts/setup.sh` then
# installs on every fresh machine. Run it after the suite passed against the newest releases:
#   bash scripts/setup.sh --latest && python -m pytest && bash scripts/freeze_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# Exact versions the test suite last passed with (bash scripts/freeze_constraints.sh)."
    echo "# setup.py keeps ranges; scripts/setup.sh installs with -c constraints.txt."
    python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' | grep -iv '^megatron_most' | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f
} >constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
