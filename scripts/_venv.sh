# Sourced by the other scripts: make .venv and install backchannel into it (editable) with the
# extras named in $BACKCHANNEL_EXTRAS. Reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed${BACKCHANNEL_EXTRAS:+-$BACKCHANNEL_EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -e ".${BACKCHANNEL_EXTRAS:+[$BACKCHANNEL_EXTRAS]}"
    touch "$stamp"
fi
