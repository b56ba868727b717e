# Sourced by scripts: make sure .venv exists with the project and its dev extras.
# Re-installs when pyproject.toml is newer than the venv's marker file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
MARK="$VENV/.jackpay-installed"
if [ ! -f "$MARK" ] || [ "$ROOT/pyproject.toml" -nt "$MARK" ]; then
    echo "installing JackPay and its dev dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev,speed]" >&2
    touch "$MARK"
fi
export PATH="$VENV/bin:$PATH"
