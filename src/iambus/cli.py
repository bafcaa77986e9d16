"""The ``iambus`` command: run a worker, tend the dead letters, show what runs and waits.

::

    iambus worker myapp.worker:dp                     # or: python -m iambus worker ...
    iambus worker myapp.worker:create --concurrency 64 --log-level DEBUG
    iambus dlq list --transport redis://127.0.0.1:6379/0
    iambus dlq show --transport redis://127.0.0.1:6379/0 1764158400123-0
    iambus dlq replay --transport redis://127.0.0.1:6379/0 --all
    iambus dlq purge --transport redis://127.0.0.1:6379/0 --all --yes
    iambus status --transport redis://127.0.0.1:6379/0 --database postgresql://app@db/shop
    iambus db init --database postgresql://app@127.0.0.1/shop      # --sql: print it instead
    iambus relay --transport redis://127.0.0.1:6379/0 --database postgresql://app@db/shop
    iambus outbox list --database postgresql://app@127.0.0.1/shop
    iambus outbox retry --database postgresql://app@127.0.0.1/shop 1042

``main(argv)`` runs it in-process and returns the exit status: 0 on success (a worker
stopped by SIGINT or SIGTERM included), 1 when the work failed (an unknown dead letter
id, an unreachable broker or database), 2 for a wrong invocation or set-up. Errors are one line on
stderr, without a traceback — except an exception raised by the application's own code
while it is imported or built, whose traceback is the useful part.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from . import __version__
from .database import Database
from .dispatching import Dispatcher
from .errors import IambusError, ImproperlyConfigured
from .logs import JsonFormatter, TextFormatter
from .monitoring import UNHEALTHY_AFTER, Server
from .relay import OutboxStatus, ParkedRow, Relay, outbox_status, parked, release
from .remote import Remote
from .status import Status, status
from .transports import (
    DeadLetter,
    DeadLetterStore,
    Instance,
    Transport,
    check_dead_letter_store,
    connect,
    redact,
)

__all__ = ["main"]

logger = logging.getLogger(__name__)

PROG = "iambus"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ALL = sys.maxsize  # dead_letters(limit=ALL): every one of them
MESSAGE_WIDTH = 60  # the message column of `dlq list`
RELAY_SHUTDOWN = 10.0  # seconds `iambus relay` gives its batch to end on SIGINT/SIGTERM

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
T = TypeVar("T")


class CliError(Exception):
    """Ends the command with ``status`` and the message on stderr, without a traceback."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``iambus`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse printed
        return exc.code if isinstance(exc.code, int) else 0
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status


# -- the parser -----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Reports a wrong invocation as one line (and status 2), as every other error is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run iambus workers, manage dead letters, show what runs and waits.",
        epilog="Run 'iambus COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    worker = commands.add_parser(
        "worker",
        help="run a dispatcher's handlers on messages from its transport",
        description=(
            "Import MODULE and serve its dispatcher ATTR until SIGINT or SIGTERM: consume "
            "the messages routed to its handlers, then stop gracefully (in-flight handlers "
            "finish within the shutdown timeout) and exit with status 0. ATTR is a "
            "Dispatcher, or a function taking no arguments that returns one (an app "
            "factory). The current directory is on the import path. --transport, --service, "
            "--concurrency and --shutdown-timeout override what the dispatcher was built with."
        ),
        epilog="Example: iambus worker myapp.worker:dp --concurrency 64 --log-level DEBUG",
    )
    worker.add_argument("app", metavar="MODULE:ATTR", help="the dispatcher, e.g. myapp.worker:dp")
    worker.add_argument(
        "--transport",
        metavar="URL",
        help="consume from this transport instead of the dispatcher's own (redis://...)",
    )
    worker.add_argument(
        "--service",
        metavar="NAME",
        type=_name,
        help="serve as this service instead of the dispatcher's own",
    )
    worker.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        help="how many handlers may run at once (default: the dispatcher's "
        "limits.concurrency, 32 unless set)",
    )
    worker.add_argument(
        "--shutdown-timeout",
        metavar="SECONDS",
        type=_seconds,
        help="how long in-flight handlers may take to finish on stop (default: the "
        "dispatcher's timeouts.shutdown, 30 unless set)",
    )
    worker.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help=f"{', '.join(LOG_LEVELS)} (default: INFO)",
    )
    _log_format(worker)
    worker.add_argument("--uvloop", action="store_true", help="run on uvloop (pip install uvloop)")
    worker.add_argument(
        "--metrics-port",
        metavar="N",
        type=_port,
        help="serve Prometheus metrics on this port at /metrics, and the health probes "
        "/health/live and /health/ready (pip install 'iambus[prometheus]'; 0: any free port)",
    )
    worker.add_argument(
        "--metrics-host",
        metavar="HOST",
        default="127.0.0.1",
        help="the address --metrics-port and --health-port listen on (default: 127.0.0.1; "
        "0.0.0.0 for every interface, as in a container)",
    )
    worker.add_argument(
        "--health-port",
        metavar="N",
        type=_port,
        help="serve the health probes alone on this port (no extra needed); with "
        "--metrics-port, only here",
    )
    worker.add_argument(
        "--unhealthy-after",
        metavar="SECONDS",
        type=_poll,
        default=UNHEALTHY_AFTER,
        help=f"/health/live fails once the transport has been down this long (default: "
        f"{UNHEALTHY_AFTER:g})",
    )
    worker.set_defaults(command=_worker)

    dlq = commands.add_parser(
        "dlq",
        help="list, show, replay or purge dead letters",
        description=(
            "Dead letters are messages a handler failed on after its last attempt, parked "
            "with the failure. Each command connects to --transport, does its work and "
            "disconnects."
        ),
    )
    actions = dlq.add_subparsers(title="commands", metavar="COMMAND", required=True)
    broker = _Parser(add_help=False)
    broker.add_argument(
        "--transport",
        metavar="URL",
        required=True,
        help="the broker holding the dead letters, e.g. redis://127.0.0.1:6379/0?namespace=shop",
    )

    _list_command(
        actions,
        broker,
        _dlq_list,
        help="list dead letters, oldest first",
        description="List dead letters, oldest first: a table, or one JSON object a line.",
    )

    show = actions.add_parser(
        "show",
        parents=[broker],
        help="show one dead letter in full",
        description="Everything about one dead letter: where it was going, the failure with "
        "its traceback excerpt, the envelope, its headers and payload.",
    )
    show.add_argument("id", metavar="ID", help="the dead letter's id (see 'iambus dlq list')")
    show.add_argument("--json", action="store_true", help="print it as one JSON object")
    show.set_defaults(command=_dlq_show)

    replay = actions.add_parser(
        "replay",
        parents=[broker],
        help="send dead letters back to the group that failed on them",
        description="Send dead letters back to the group (the handler, or the service) that "
        "failed on them, and only to it; they leave the dead letters.",
    )
    replay.add_argument("ids", metavar="ID", nargs="*", help="dead letter ids")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    replay.set_defaults(command=_dlq_replay)

    purge = actions.add_parser(
        "purge",
        parents=[broker],
        help="delete dead letters",
        description="Delete dead letters for good.",
    )
    purge.add_argument("ids", metavar="ID", nargs="*", help="dead letter ids")
    purge.add_argument("--all", action="store_true", help="delete every dead letter")
    purge.add_argument("-y", "--yes", action="store_true", help="confirm --all")
    purge.set_defaults(command=_dlq_purge)

    database = _Parser(add_help=False)
    database.add_argument(
        "--database",
        metavar="DSN",
        help="the PostgreSQL database of the outbox, e.g. postgresql://app@127.0.0.1/shop",
    )
    database.add_argument(
        "--schema", metavar="NAME", help="the schema of iambus's tables (default: the search path)"
    )
    database.add_argument(
        "--prefix",
        metavar="PREFIX",
        default="iambus_",
        help="the prefix of iambus's table names (default: iambus_)",
    )

    state = commands.add_parser(
        "status",
        parents=[database],
        help="show the live instances, each group's backlog and dead letters, the outbox",
        description=(
            "With --transport: per service and group, the live instances consuming it, and "
            "how many messages wait for it, are in flight (delivered, not yet settled), "
            "wait out a retry's delay, and are dead letters; '-' where the broker cannot "
            "tell (see docs/cli.md); then the live instances. With --database: the "
            "outbox's backlog (rows not yet sent), its oldest row's age, and its parked "
            "rows. Either or both."
        ),
    )
    state.add_argument(
        "--transport",
        metavar="URL",
        help="the broker, e.g. redis://127.0.0.1:6379/0?namespace=shop",
    )
    state.add_argument("--json", action="store_true", help="print it as one JSON object")
    state.set_defaults(command=_status)

    _database_commands(commands, database)
    return parser


def _database_commands(commands: Any, database: argparse.ArgumentParser) -> None:
    """``iambus db``, ``iambus relay`` and ``iambus outbox``."""
    db = commands.add_parser(
        "db",
        help="create iambus's tables (the outbox and the inbox)",
        description="Manage iambus's tables in a PostgreSQL database.",
    )
    actions = db.add_subparsers(title="commands", metavar="COMMAND", required=True)
    init = actions.add_parser(
        "init",
        parents=[database],
        help="create the outbox and inbox tables (or print their SQL)",
        description=(
            "Create iambus's tables (and the schema) if they do not exist, then check "
            "their shape. --sql prints the SQL instead (for a migration), without "
            "connecting; Database.metadata() gives the same tables to Alembic."
        ),
        epilog="Example: iambus db init --database postgresql://app@127.0.0.1/shop",
    )
    init.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    init.set_defaults(command=_db_init)

    relay = commands.add_parser(
        "relay",
        parents=[database],
        help="send the outbox's committed messages to the broker",
        description=(
            "Send the messages units of work committed to the outbox to --transport, "
            "then delete them, until SIGINT or SIGTERM (then finish the sends in flight "
            "and exit with status 0). Any number of relays may run at once: each "
            "message is sent once in normal operation, a key's messages in commit order. "
            "Woken by the NOTIFY that follows each commit; polls every --poll seconds too."
        ),
        epilog=(
            "Example: iambus relay --transport redis://127.0.0.1:6379/0 "
            "--database postgresql://app@127.0.0.1/shop"
        ),
    )
    relay.add_argument(
        "--transport", metavar="URL", required=True, help="the broker to send to (redis://...)"
    )
    relay.add_argument(
        "--batch",
        metavar="N",
        type=_positive_int,
        default=1000,
        help="rows sent and deleted per transaction (default: 1000)",
    )
    relay.add_argument(
        "--poll",
        metavar="SECONDS",
        type=_poll,
        default=1.0,
        help="seconds between two looks at the outbox without a notification (default: 1)",
    )
    relay.add_argument(
        "--no-listen",
        action="store_true",
        help="do not LISTEN for commits, only poll (behind a transaction-pooling proxy, "
        "notifications never arrive)",
    )
    relay.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help=f"{', '.join(LOG_LEVELS)} (default: INFO)",
    )
    _log_format(relay)
    relay.set_defaults(command=_relay)

    outbox = commands.add_parser(
        "outbox",
        help="list or retry the outbox rows the relay parked",
        description=(
            "A row the relay cannot send (its envelope does not decode, the broker rejects "
            "it) is parked: kept in the outbox with the reason, and not sent until retried."
        ),
    )
    actions = outbox.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _list_command(
        actions,
        database,
        _outbox_list,
        help="list the parked rows, oldest first",
        description="List the parked outbox rows with the reason: a table, or JSON lines.",
    )
    retry = actions.add_parser(
        "retry",
        parents=[database],
        help="give parked rows back to the relays",
        description="Give parked rows back to the relays, which send them at once (and park "
        "them again if the reason was not fixed).",
    )
    retry.add_argument(
        "positions", metavar="POSITION", nargs="*", type=int, help="parked rows' positions"
    )
    retry.add_argument("--all", action="store_true", help="retry every parked row")
    retry.set_defaults(command=_outbox_retry)


def _list_command(
    actions: Any,
    parent: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], int],
    *,
    help: str,
    description: str,
) -> None:
    """A ``list`` command (``--limit``, ``--json``) under ``actions``."""
    listing = actions.add_parser("list", parents=[parent], help=help, description=description)
    listing.add_argument(
        "--limit", metavar="N", type=_positive_int, default=100, help="at most N (default: 100)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(command=command)


def _log_format(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines, or one JSON object per line (default: text; see iambus.logs)",
    )


def _logging(args: argparse.Namespace) -> None:
    """Log to stderr at ``--log-level``, as ``--log-format`` says; a URL's password is
    never shown, whoever logs it (see iambus.logs)."""
    handler = logging.StreamHandler()
    json_lines = args.log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(LOG_FORMAT))
    logging.basicConfig(level=args.log_level, handlers=[handler])


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port (0 to 65535), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}")
    return value


def _poll(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected seconds (a number > 0), got {text!r}")
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    return text


# -- iambus worker --------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    spec: str = args.app
    _logging(args)
    # Like `python -m` and uvicorn: the application is found from the current directory.
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    loop_factory = _loop_factory() if args.uvloop else None
    dp = _load_dispatcher(spec)
    _configure(dp, spec, args)
    servers = _servers(dp, args)
    logger.info("iambus: serving %s; stop it with SIGINT (Ctrl-C) or SIGTERM", spec)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(dp, servers))
    except ImproperlyConfigured as exc:  # found at start: e.g. a handler of another's command
        raise CliError(f"{spec}: {exc}") from None
    except ImportError as exc:  # the driver of the dispatcher's transport is not installed
        raise CliError(f"{spec}: {exc}") from None
    except IambusError as exc:  # e.g. the broker is unreachable
        raise CliError(str(exc), status=1) from None
    except KeyboardInterrupt:  # interrupted before the dispatcher took over the signals
        return 130
    except Exception as exc:
        # The dispatcher's database, unreachable or failing as its relay starts: one line,
        # as `iambus relay` says it (a supervisor restarts the worker).
        if dp.database is None or not isinstance(exc, _database_errors()):
            raise
        where = dp.database.source if dp.database.kind == "dsn" else repr(dp.database)
        raise CliError(
            f"{spec}: the database {redact(str(where))} failed: {type(exc).__name__}: {exc}",
            status=1,
        ) from None
    logger.info("iambus: %s stopped", spec)
    return 0


def _servers(dp: Dispatcher, args: argparse.Namespace) -> list[Server]:
    """The HTTP servers of ``--metrics-port`` and ``--health-port``, not yet listening."""
    servers: list[Server] = []
    host: str = args.metrics_host
    if args.metrics_port is not None:
        try:
            servers.append(
                Server(
                    dp,
                    host=host,
                    port=args.metrics_port,
                    health=args.health_port is None,
                    unhealthy_after=args.unhealthy_after,
                )
            )
        except (ImportError, NotADirectoryError) as exc:
            raise CliError(f"--metrics-port: {exc}") from None
    if args.health_port is not None:
        if args.health_port == args.metrics_port and args.health_port != 0:
            raise CliError(
                f"--health-port {args.health_port} is --metrics-port too: leave --health-port "
                f"out (the metrics port serves the probes), or give it another port"
            )
        servers.append(
            Server(
                dp,
                host=host,
                port=args.health_port,
                metrics=False,
                unhealthy_after=args.unhealthy_after,
            )
        )
    return servers


async def _serve(dp: Dispatcher, servers: list[Server]) -> None:
    """Run ``dp`` with ``servers`` listening from before it starts until it stopped."""
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            try:
                await stack.enter_async_context(server)
            except OSError as exc:
                flag = "--metrics-port" if server.metrics else "--health-port"
                raise CliError(
                    f"{flag} {server.port}: cannot listen on {server.host}:{server.port}: "
                    f"{exc.strerror or exc}"
                ) from None
        await dp.run()


def _load_dispatcher(spec: str) -> Dispatcher:
    """The dispatcher ``spec`` (``"module:attr"``) names: the object, or what a factory returns.

    Raises ``CliError`` (status 2) saying what is wrong.
    """
    module_name, colon, attr = spec.partition(":")
    if not (colon and _dotted(module_name) and _dotted(attr)):
        raise CliError(f"expected MODULE:ATTR, e.g. 'myapp.worker:dp', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise CliError(
                f"cannot import module {module_name!r}: {exc} (looked in the current "
                f"directory {os.getcwd()} and on sys.path)"
            ) from None
        raise CliError(f"importing module {module_name!r} failed: {exc}") from None
    except ImproperlyConfigured as exc:
        raise CliError(f"importing module {module_name!r} failed: {exc}") from None
    # Any other exception is a bug in the application: its traceback says where.

    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CliError(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Dispatcher):
        return target
    if not callable(target) or isinstance(target, type):
        raise CliError(
            f"{spec} is a {type(target).__name__}, not a Dispatcher (or a function taking "
            f"no arguments that returns one)"
        )
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise CliError(
            f"{spec} needs arguments; an app factory is called with none: give it defaults, "
            f"or point at the Dispatcher itself"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): just call it
    try:
        made = target()
    except ImproperlyConfigured as exc:
        raise CliError(f"{spec}() failed: {exc}") from None
    if inspect.iscoroutine(made):
        made.close()  # never awaited: close it, or Python warns about it
        raise CliError(f"{spec} is async; an app factory must be a plain function (def)")
    if not isinstance(made, Dispatcher):
        raise CliError(f"{spec}() returned a {type(made).__name__}, not a Dispatcher")
    return made


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _configure(dp: Dispatcher, spec: str, args: argparse.Namespace) -> None:
    """Check that ``dp`` can serve, and apply the command line's overrides to it."""
    if dp.remote is None and args.transport is None:
        raise CliError(
            f"{spec} has no transport, so there is nothing to consume: build its "
            f"Dispatcher with transport=... and routes={{...}} (--transport can then "
            f"point it at another broker)"
        )
    if not dp.routes:
        raise CliError(
            f"{spec} routes no messages, so a worker has nothing to consume: pass "
            f"Dispatcher(transport=..., service=..., routes={{...}}) the messages its "
            f"handlers serve"
        )
    if args.transport is not None or args.service is not None:
        if dp.started:
            raise CliError(
                f"{spec} was started on import; --transport and --service only apply to a "
                f"dispatcher that has not started yet"
            )
        # The transport is fixed when a Dispatcher is built: the link to it (its Remote)
        # is built anew, exactly as Dispatcher.__init__ does, keeping the codec, the
        # request timeout and the routes. Nothing has used the old link yet (not started),
        # so dropping it loses nothing; one made from a URL was never opened.
        old = dp.remote
        assert old is not None  # checked above: no transport means no routes
        # old.source, not old.transport: the dispatcher's own transport is not made (nor
        # its driver imported) when --transport replaces it.
        transport, owned = old.source, old.owned
        if args.transport is not None:
            transport, owned = _connect(args.transport), True
        if args.service is not None:
            dp.service = args.service
        dp.remote = Remote(
            transport,
            service=dp.service,
            routes=dp.routes,
            codec=old.codec,
            request_timeout=old.request_timeout,
            owned=owned,
        )
    if args.concurrency is not None:
        dp.limits = dataclasses.replace(dp.limits, concurrency=args.concurrency)
    if args.shutdown_timeout is not None:
        dp.timeouts = dataclasses.replace(dp.timeouts, shutdown=args.shutdown_timeout)


def _loop_factory() -> LoopFactory:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        raise CliError(
            "--uvloop needs uvloop, which is not installed: pip install uvloop"
        ) from None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


# -- iambus dlq -----------------------------------------------------------------------


def _dlq_list(args: argparse.Namespace) -> int:
    async def work(transport: Transport) -> int:
        letters = await check_dead_letter_store(transport).dead_letters(limit=args.limit)
        _listing(args, letters, _as_json, _table, f"no dead letters on {transport.url}")
        return 0

    return _with_transport(args.transport, work)


def _listing(
    args: argparse.Namespace,
    items: list[T],
    as_json: Callable[[T], dict[str, Any]],
    table: Callable[[list[T]], str],
    none: str,
) -> None:
    """Print ``items``: a table (``none`` when there is none), or JSON lines with --json;
    say on stderr when --limit may have cut the list."""
    if args.json:
        for item in items:
            print(json.dumps(as_json(item)))
    else:
        print(table(items) if items else none)
    if len(items) == args.limit:
        print(
            f"(the first {args.limit}; there may be more: pass --limit to see them)",
            file=sys.stderr,
        )


def _dlq_show(args: argparse.Namespace) -> int:
    async def work(transport: Transport) -> int:
        store = check_dead_letter_store(transport)
        letters = {letter.id: letter for letter in await store.dead_letters(limit=ALL)}
        letter = letters.get(args.id)
        if letter is None:
            raise CliError(
                f"no dead letter {args.id!r} on {transport.url}; 'iambus dlq list' shows the ids",
                status=1,
            )
        print(json.dumps(_as_json(letter), indent=2) if args.json else _details(letter))
        return 0

    return _with_transport(args.transport, work)


def _dlq_replay(args: argparse.Namespace) -> int:
    _check_selection(args, "replay")

    async def work(transport: Transport) -> int:
        store = check_dead_letter_store(transport)
        ids, unknown = await _select(store, args)
        replayed = await store.replay(ids) if ids else 0
        print(f"replayed {_count(replayed)}")
        return _report_unknown(unknown, transport)

    return _with_transport(args.transport, work)


def _dlq_purge(args: argparse.Namespace) -> int:
    _check_selection(args, "purge")
    if args.all and not args.yes:
        raise CliError("purge --all deletes every dead letter for good: add --yes to confirm")

    async def work(transport: Transport) -> int:
        store = check_dead_letter_store(transport)
        if args.all:
            print(f"purged {_count(await store.purge(None))}")
            return 0
        ids, unknown = await _select(store, args)
        purged = await store.purge(ids) if ids else 0
        print(f"purged {_count(purged)}")
        return _report_unknown(unknown, transport)

    return _with_transport(args.transport, work)


# -- iambus status ----------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    if args.transport is None and args.database is None:
        raise CliError("status: give --transport URL, --database DSN, or both")
    found: Status | None = None
    outbox: OutboxStatus | None = None
    if args.transport is not None:

        async def work(transport: Transport) -> int:
            nonlocal found
            found = await status(transport)
            return 0

        _with_transport(args.transport, work, what="its workers and queues")
    table = ""
    if args.database is not None:

        async def look(database: Database) -> int:
            nonlocal outbox, table
            outbox, table = await outbox_status(database), _plain(database.outbox)
            return 0

        _with_database(args, look)
    if args.json:
        shown = {} if found is None else _status_json(found)
        if outbox is not None:
            shown["outbox"] = {"table": table, **_outbox_json(outbox)}
        print(json.dumps(shown))
        return 0
    parts = [] if found is None else [_status_table(found)]
    if outbox is not None:
        parts.append(_outbox_table(table, outbox))
    print("\n\n".join(parts))
    return 0


def _status_table(found: Status) -> str:
    if not found.groups and not found.instances:
        return f"no groups and no live instances on {found.url}"
    now = time.time()
    rows: list[tuple[str, ...]] = [
        ("SERVICE", "GROUP", "ADDRESS", "INSTANCES", "WAITING", "IN FLIGHT", "RETRYING", "DEAD")
    ]
    rows += [
        (
            group.service,
            group.group,
            group.address,
            str(len(group.instances)),
            _or_none(group.waiting),
            _or_none(group.in_flight),
            _or_none(group.retrying),
            _or_none(group.dead),
        )
        for group in found.groups
    ]
    lines = [_columns(rows)]
    if found.instances:
        members: list[tuple[str, ...]] = [("INSTANCE", "SERVICE", "HOST", "PID", "UP")]
        members += [
            (i.id, i.service, i.host, str(i.pid), _age(now - i.started)) for i in found.instances
        ]
        lines += ["", _columns(members)]
    else:
        lines += ["", "no live instances"]
    return "\n".join(lines)


def _status_json(found: Status) -> dict[str, Any]:
    def instance(i: Instance) -> dict[str, Any]:
        return {
            "id": i.id,
            "service": i.service,
            "host": i.host,
            "pid": i.pid,
            "started": i.started,
            "consumes": [list(pair) for pair in i.consumes],
        }

    return {
        "url": found.url,
        "groups": [
            {
                "service": g.service,
                "group": g.group,
                "address": g.address,
                "instances": [i.id for i in g.instances],
                "waiting": g.waiting,
                "in_flight": g.in_flight,
                "retrying": g.retrying,
                "dead": g.dead,
            }
            for g in found.groups
        ],
        "instances": [instance(i) for i in found.instances],
    }


def _outbox_table(table: str, found: OutboxStatus) -> str:
    oldest = "-" if found.oldest_age is None else _age(found.oldest_age)
    rows = [("OUTBOX", "BACKLOG", "OLDEST", "PARKED")]
    rows.append((table, str(found.backlog), oldest, str(found.parked)))
    return _columns(rows)


def _outbox_json(found: OutboxStatus) -> dict[str, Any]:
    return {"backlog": found.backlog, "oldest_age": found.oldest_age, "parked": found.parked}


# -- iambus db, relay, outbox -----------------------------------------------------------


def _db_init(args: argparse.Namespace) -> int:
    if args.sql:
        # The SQL needs no connection: any DSN makes the Database that writes it.
        print(_database(args, "postgresql://").ddl(), end="")
        return 0
    if args.database is None:
        raise CliError("db init: give --database DSN (or --sql to print the SQL instead)")

    async def work(database: Database) -> int:
        try:
            await database.create()
        except _database_errors():
            # A table made before, by hand or by another version, may lack a column the
            # indexes use: the check names what is missing (and the SQL rolled back). No
            # table at all: the driver's error says why (no right to create, say).
            async with database.connection() as conn:
                there = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", database.outbox)
            if there:
                await database.check()
            raise
        await database.check()  # a table of another shape that the SQL did not trip on
        print(f"iambus's tables are ready: {_plain(database.outbox)}, {_plain(database.inbox)}")
        return 0

    return _with_database(args, work, check=False)


def _relay(args: argparse.Namespace) -> int:
    _logging(args)
    if urlsplit(args.transport).scheme == "memory":
        raise CliError(
            "memory:// lives inside one process, so a relay of its own sends to nobody: "
            "point --transport at a broker"
        )
    transport = _connect(args.transport)

    async def serve(database: Database) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for number in signals:
            loop.add_signal_handler(number, _stop_on, number, stop)
        try:
            await transport.open()
            try:
                relay = Relay(
                    database, transport, batch=args.batch, poll=args.poll, listen=not args.no_listen
                )
                await relay.start()
                logger.info(
                    "iambus relay: %s -> %s (batch %d, poll %g s, %s); stop it with SIGINT "
                    "(Ctrl-C) or SIGTERM",
                    _plain(database.outbox),
                    transport.url,
                    relay.batch,
                    relay.poll,
                    "listening" if relay.listening else "polling only",
                )
                await stop.wait()
                await relay.stop(loop.time() + RELAY_SHUTDOWN)
            finally:
                await transport.close()
        finally:
            for number in signals:
                loop.remove_signal_handler(number)
        logger.info("iambus relay: stopped")
        return 0

    return _with_database(args, serve)


def _stop_on(number: int, stop: asyncio.Event) -> None:
    logger.info("iambus relay: received %s, stopping", signal.Signals(number).name)
    stop.set()


def _outbox_list(args: argparse.Namespace) -> int:
    async def work(database: Database) -> int:
        rows = await parked(database, limit=args.limit)
        none = f"no parked rows in {_plain(database.outbox)}"
        _listing(args, rows, _parked_json, _parked_table, none)
        return 0

    return _with_database(args, work)


def _outbox_retry(args: argparse.Namespace) -> int:
    if args.all and args.positions:
        raise CliError("retry: give positions or --all, not both")
    if not args.all and not args.positions:
        raise CliError(
            "retry: give the positions of the parked rows to retry ('iambus outbox list' "
            "shows them), or --all"
        )

    async def work(database: Database) -> int:
        wanted = None if args.all else list(dict.fromkeys(args.positions))
        released = await release(database, wanted)
        print(f"retrying {len(released)} parked row{'' if len(released) == 1 else 's'}")
        unknown = [] if wanted is None else [p for p in wanted if p not in set(released)]
        if unknown:
            print(
                f"{PROG}: error: no parked row at position {', '.join(map(str, unknown))} "
                f"in {_plain(database.outbox)}",
                file=sys.stderr,
            )
            return 1
        return 0

    return _with_database(args, work)


def _parked_table(rows: list[ParkedRow]) -> str:
    now = time.time()
    table = [("POSITION", "MESSAGE", "NAME", "ADDRESS", "KEY", "ATTEMPTS", "AGE", "ERROR")]
    table += [
        (
            str(row.position),
            row.message_id,
            row.name,
            row.address,
            _or_none(row.key),
            str(row.attempts),
            _age(now - row.parked_at),
            _clip(" ".join(row.error.split()), MESSAGE_WIDTH),
        )
        for row in rows
    ]
    return _columns(table)


def _parked_json(row: ParkedRow) -> dict[str, Any]:
    return {
        "position": row.position,
        "message_id": row.message_id,
        "name": row.name,
        "address": row.address,
        "key": row.key,
        "attempts": row.attempts,
        "error": row.error,
        "parked_at": row.parked_at,
    }


def _database(args: argparse.Namespace, dsn: str | None = None) -> Database:
    dsn = dsn or args.database
    if dsn is None:
        raise CliError(
            "--database DSN is required: the PostgreSQL database of iambus's tables, e.g. "
            "postgresql://app@127.0.0.1/shop"
        )
    try:
        database = Database(dsn, schema=args.schema, prefix=args.prefix)
    except ImproperlyConfigured as exc:
        raise CliError(str(exc).replace(dsn, redact(dsn))) from None
    return database


def _with_database(
    args: argparse.Namespace, work: Callable[[Database], Awaitable[int]], *, check: bool = True
) -> int:
    """Run ``work`` with the database of ``--database``, its tables checked first; close
    it. Errors become one line: status 2 for a set-up to fix, 1 for a database that
    failed or cannot be reached."""
    database = _database(args)

    async def session() -> int:
        try:
            if check:
                await database.check()
            return await work(database)
        finally:
            await database.close()

    return _run(session(), dsn=args.database)


def _run(session: Coroutine[Any, Any, int], *, dsn: str | None = None) -> int:
    """``asyncio.run(session)``, its errors as one line: ``ImproperlyConfigured`` with
    status 2, another iambus error (and with ``dsn``, a database's) with status 1."""
    try:
        return asyncio.run(session)
    except ImproperlyConfigured as exc:
        raise CliError(str(exc)) from None
    except IambusError as exc:
        raise CliError(str(exc), status=1) from None
    except Exception as exc:
        if dsn is None or not isinstance(exc, _database_errors()):
            raise
        raise CliError(
            f"the database {redact(dsn)} failed: {type(exc).__name__}: {exc}", status=1
        ) from None


def _database_errors() -> tuple[type[Exception], ...]:
    """What a database that failed or cannot be reached raises (asyncpg's errors, a
    refused or lost connection; ``InternalClientError``: a connection terminated in the
    middle of an operation, as when the server is restarted while a process starts)."""
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - Database.open() said which extra to install
        return (OSError,)
    return (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def _plain(table: str) -> str:
    """A quoted, qualified table name as a reader writes it: schema.table."""
    return table.replace('"', "")


def _check_selection(args: argparse.Namespace, action: str) -> None:
    if args.all and args.ids:
        raise CliError(f"{action}: give dead letter ids or --all, not both")
    if not args.all and not args.ids:
        raise CliError(f"{action}: give the ids of the dead letters to {action}, or --all")


async def _select(store: DeadLetterStore, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The ids to act on, and the ids given that are not dead letters."""
    # Checked against the list first: a broker may reject an id it cannot parse (Redis
    # does), and an unknown id deserves its own message rather than a broker error.
    known = [letter.id for letter in await store.dead_letters(limit=ALL)]
    if args.all:
        return known, []
    wanted = list(dict.fromkeys(args.ids))
    present = set(known)
    return [i for i in wanted if i in present], [i for i in wanted if i not in present]


def _report_unknown(unknown: list[str], transport: Transport) -> int:
    if not unknown:
        return 0
    print(
        f"{PROG}: error: no dead letter {', '.join(map(repr, unknown))} on {transport.url}",
        file=sys.stderr,
    )
    return 1


def _with_transport(
    url: str, work: Callable[[Transport], Awaitable[int]], *, what: str = "its dead letters"
) -> int:
    """Open the transport at ``url``, run ``work`` with it, close it."""
    if urlsplit(url).scheme == "memory":
        raise CliError(
            f"memory:// lives inside one process, so another process cannot see {what}: "
            f"use the transport's methods there, or point --transport at a broker"
        )
    transport = _connect(url)

    async def session() -> int:
        await transport.open()
        try:
            return await work(transport)
        finally:
            await transport.close()

    return _run(session())


def _connect(url: str) -> Transport:
    try:
        return connect(url)
    except (ImproperlyConfigured, ImportError) as exc:
        raise CliError(str(exc)) from None


# -- output ---------------------------------------------------------------------------


def _columns(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _table(letters: list[DeadLetter]) -> str:
    now = time.time()
    rows = [("ID", "ADDRESS", "GROUP", "ERROR", "MESSAGE", "ATTEMPTS", "AGE")]
    rows += [
        (
            letter.id,
            letter.address,
            letter.group,
            letter.failure.error_type.removeprefix("builtins."),
            _clip(" ".join(letter.failure.message.split()), MESSAGE_WIDTH),
            str(letter.failure.attempts),
            _age(now - letter.failed_at),
        )
        for letter in letters
    ]
    return _columns(rows)


def _details(letter: DeadLetter) -> str:
    envelope, failure = letter.envelope, letter.failure
    lines = [
        f"id:        {letter.id}",
        f"address:   {letter.address}",
        f"group:     {letter.group}",
        f"handler:   {failure.handler or '(none: it never reached one)'}",
        f"failed at: {_when(letter.failed_at)} ({_age(time.time() - letter.failed_at)} ago)",
        f"attempts:  {failure.attempts}",
        # A message of several lines keeps its lines, aligned under the first.
        f"error:     {failure.error_type}: {failure.message}".replace("\n", "\n" + " " * 11),
        "",
        "envelope:",
        f"  id:             {envelope.id}",
        f"  name:           {envelope.name}",
        f"  created at:     {_when(envelope.created_at)}",
        f"  key:            {_or_none(envelope.key)}",
        f"  correlation id: {_or_none(envelope.correlation_id)}",
        f"  causation id:   {_or_none(envelope.causation_id)}",
        f"  reply to:       {_or_none(envelope.reply_to)}",
        f"  content type:   {envelope.content_type}",
        "headers:" if envelope.headers else "headers: (none)",
        *(f"  {name}: {value}" for name, value in envelope.headers.items()),
    ]
    text = _text(envelope.payload)
    if text is None:
        lines.append(f"payload ({len(envelope.payload)} bytes, not UTF-8):")
        lines.append(f"  {envelope.payload!r}")
    else:
        lines.append(f"payload ({len(envelope.payload)} bytes):")
        lines += [f"  {line}" for line in text.splitlines() or [""]]
    if failure.traceback:
        lines.append("traceback (excerpt):")
        lines += [f"  {line}" for line in failure.traceback.rstrip("\n").splitlines()]
    else:
        lines.append("traceback: (none)")
    return "\n".join(lines)


def _as_json(letter: DeadLetter) -> dict[str, Any]:
    envelope, failure = letter.envelope, letter.failure
    text = _text(envelope.payload)
    payload: dict[str, Any] = (
        {"payload": text}
        if text is not None
        else {"payload_base64": base64.b64encode(envelope.payload).decode("ascii")}
    )
    return {
        "id": letter.id,
        "address": letter.address,
        "group": letter.group,
        "failed_at": letter.failed_at,
        "error_type": failure.error_type,
        "message": failure.message,
        "attempts": failure.attempts,
        "handler": failure.handler,
        "traceback": failure.traceback,
        "envelope": {
            "id": envelope.id,
            "name": envelope.name,
            "created_at": envelope.created_at,
            "key": envelope.key,
            "correlation_id": envelope.correlation_id,
            "causation_id": envelope.causation_id,
            "reply_to": envelope.reply_to,
            "content_type": envelope.content_type,
            "headers": dict(envelope.headers),
            **payload,
        },
    }


def _text(payload: bytes) -> str | None:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def _or_none(value: str | int | None) -> str:
    return "-" if value is None else str(value)


def _count(n: int) -> str:
    return f"{n} dead letter{'' if n == 1 else 's'}"
