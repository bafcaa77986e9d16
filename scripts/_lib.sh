# Shared by the scripts in this folder; sourced, not run.
set -euo pipefail
cd "$(dirname "$0")/.."

# find_python VERSION: print a command running that Python (e.g. "python3.12"), or
# nothing. Knows plain installs and pyenv, whose shims need PYENV_VERSION set.
find_python() {
    local want=$1 full
    if command -v "python$want" >/dev/null 2>&1 && "python$want" -c '' >/dev/null 2>&1; then
        echo "python$want"
        return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        full=$(pyenv versions --bare 2>/dev/null | grep -E "^$want(\.[0-9]+)?$" | sort -V | tail -n 1 || true)
        if [ -n "$full" ] && PYENV_VERSION=$full "python$want" -c '' >/dev/null 2>&1; then
            echo "env PYENV_VERSION=$full python$want"
        fi
    fi
}

# make_venv DIR PYTHON EXTRAS [latest]: create DIR with PYTHON if needed and install
# iambus into it in editable mode with EXTRAS (e.g. "[dev]", or "" for none), every
# dependency at the version constraints.txt pins; with "latest", at the newest release
# instead (scripts/check --latest).
make_venv() {
    local dir=$1 python=$2 extras=$3 latest=${4:-}
    if [ ! -x "$dir/bin/python" ]; then
        echo "== creating $dir with $($python --version 2>&1)"
        $python -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    fi
    if [ -n "$latest" ]; then
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
            --upgrade --upgrade-strategy eager -e ".$extras"
    else
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
            -c constraints.txt -e ".$extras"
    fi
}

default_python() {
    local py
    for v in 3.11 3.12 3.13; do
        py=$(find_python "$v")
        if [ -n "$py" ]; then echo "$py"; return; fi
    done
    if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo python3
        return
    fi
    echo "iambus needs Python >= 3.11; none found (tried python3.11, python3.12, python3.13, python3)" >&2
    exit 1
}
