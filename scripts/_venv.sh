# Sourced by scripts: make sure .venv exists with the project and its dev extras.
# Re-installs when pyproject.toml is newer than the venv's marker file.
set -euo pipefail
ROOT="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
MARK="$VENV/.jackpay-installed"
if [ ! -f "$MARK" ] || [ "$ROOT/pyproject.toml" -nt "$MARK" ]; then
    echo "installing JackPay and its dev dependencies into $VENV" >&2
    # The installer's chatter goes to a log, shown only if the install fails.
    INSTALL_LOG="$VENV/install.log"
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -e "$ROOT[dev,speed]" >"$INSTALL_LOG" 2>&1; then
        cat "$INSTALL_LOG" >&2
        echo "installing into $VENV failed (log above, also in $INSTALL_LOG)" >&2
        exit 1
    fi
    touch "$MARK"
fi
export PATH="$VENV/bin:$PATH"

# `run_module MODULE ARGS...`: exec `python -m MODULE ARGS...` from the caller's folder, so
# every path a user types (a config, --run-dir, ...) means what it means in their shell.
# Never `cd "$ROOT"` first. -P keeps the caller's folder off sys.path (a common/ or bench/
# there must not shadow ours); PYTHONPATH finds this checkout's packages from anywhere.
run_module() {
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec python -P -m "$@"
}

# `ensure_postgresql`: the PostgreSQL 15 server binaries the tests' throwaway clusters need
# (ledger/pgcluster.py). Nothing to do when they are there; else, as root, install
# postgresql-15 with apt-get (no default cluster is created or started), its chatter in
# .venv/postgresql-install.log, shown only if the install fails.
PG_BINDIR="/usr/lib/postgresql/15/bin"
ensure_postgresql() {
    [ -x "$PG_BINDIR/initdb" ] && return 0
    local as_root=()
    if [ "$(id -u)" != 0 ]; then
        if ! sudo -n true 2>/dev/null; then
            echo "PostgreSQL 15 is not installed and we are neither root nor allowed sudo:" \
                 "the PostgreSQL tests will fail (install it: sudo apt-get install -y" \
                 "postgresql-15; or set JACKPAY_ALLOW_NO_PG=1 to skip them)" >&2
            return 0
        fi
        as_root=(sudo -n)
    fi
    echo "installing PostgreSQL 15 (apt-get install postgresql-15)" >&2
    local log="$VENV/postgresql-install.log"
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        "${as_root[@]}" mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" |
            "${as_root[@]}" tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    local apt=("${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0)
    if ! { "${apt[@]}" install --no-install-recommends postgresql-15 ||
           { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends postgresql-15; }
         } >"$log" 2>&1; then
        cat "$log" >&2
        echo "installing postgresql-15 failed (log above, also in $log)" >&2
        exit 1
    fi
}
