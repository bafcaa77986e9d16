"""The unit of work: a handler's database writes and the messages it sends, committed together.

A handler run in a unit of work gets a database transaction of its own; its session or
connection is passed to it (a parameter typed ``AsyncSession`` or ``asyncpg.Connection``,
or bound to the ``Session`` / ``Connection`` providers)::

    @dp.commands.register(PlaceOrder)
    async def place_order(command: PlaceOrder, session: AsyncSession) -> None:
        session.add(Order(command.order_id))
        await dp.publish(OrderPlaced(command.order_id))   # or return it: an event

Everything the handler sends while the unit is open — events it publishes, returns or
adds, commands it sends, messages it hands over with ``handle()`` — is collected:

* a *routed* message (one that goes to a transport) is written to the outbox table in the
  same transaction, and sent by the relay once committed (``outbox``, ``relay``);
* an *in-process* message is handled after the commit (never when the transaction rolls
  back), as it would have been without a unit of work.

On success the unit writes its outbox rows and commits; on an exception nothing is
written, the transaction rolls back, and the exception goes on (a delivery from a
transport is retried as always). On a delivery from a transport, the unit first records
the envelope id with the handler's name in the inbox (``inbox``): a redelivery whose
record exists is acked without running the handler again.

``execute()`` and ``query()`` of an in-process handler run at once, inside the unit (a
handler of theirs that takes a session gets the same one, and joins the same unit). A
routed query is asked at once. A routed *command* cannot be awaited inside a unit: it is
only sent when the unit commits (``WouldDeadlock``); ``send()`` it instead.

Outside a handler (an HTTP endpoint, a script), ``dp.unit_of_work(session)`` opens a unit
on the caller's own session or connection::

    async with AsyncSession(engine) as session:
        async with dp.unit_of_work(session):
            session.add(Order(7))
            await dp.publish(OrderPlaced(7))   # written to the outbox in this transaction

The block commits the transaction it began, and rolls it back if the block raises. If the
session is already in a transaction when the block starts, the block joins it: the
outbox rows are written into it when the block ends, and committing is left to the
caller; in-process messages are then handled when the block ends, before that commit.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .database import Database
from .envelope import Envelope
from .errors import ImproperlyConfigured, TransactionFailed
from .inbox import claim
from .outbox import Outgoing, write
from .providers import Factory

__all__ = ["Connection", "Session", "UnitOfWork", "current_unit"]

logger = logging.getLogger(__name__)

Later = Callable[[], Awaitable[Any]]

current_unit: contextvars.ContextVar[UnitOfWork | None] = contextvars.ContextVar(
    "iambus_current_unit", default=None
)


class Owner(Protocol):
    """Whose sends a unit of work collects (a dispatcher's route table): it counts the
    units open on it, so that while none is, its sends skip looking for one."""

    units: int


class UnitOfWork:
    """One open transaction and what was sent in it (see the module's docstring)."""

    __slots__ = (
        "_raw",
        "database",
        "later",
        "outgoing",
        "owner",
        "remote",
        "session",
        "wrote",
    )

    def __init__(self, owner: Owner, database: Database, remote: object, session: Any):
        self.owner = owner
        self.database = database
        # The dispatcher's link to its transport (a Remote, or None): its routed sends
        # go to this unit's outbox, and only its (a unit belongs to one dispatcher).
        self.remote = remote
        self.session = session
        """What the handler gets: an ``AsyncSession``, or an asyncpg connection."""
        self.outgoing: list[Outgoing] = []
        self.later: list[Later] = []  # in-process work, run once committed
        self.wrote = False  # outbox rows were written
        self._raw: Any = None if _is_sqlalchemy(session) else session

    async def connection(self) -> Any:
        """The asyncpg connection the transaction runs on (for a SQLAlchemy session, the
        driver connection under it: SQL on it joins the session's transaction)."""
        if self._raw is None:
            connection = await self.session.connection()
            raw = await connection.get_raw_connection()
            self._raw = raw.driver_connection
        return self._raw

    def send(self, address: str, envelope: Envelope) -> None:
        """Collect a routed message: written to the outbox when the unit flushes."""
        self.outgoing.append(Outgoing(address, envelope))

    def after_commit(self, work: Later) -> None:
        """Run ``work`` (in-process handling) once the unit has committed."""
        self.later.append(work)

    async def flush(self, *, notify: bool = True) -> None:
        """Write the collected messages to the outbox, in the unit's transaction.
        ``notify``: the transaction wakes the relays at its commit (False: the caller
        does, once it has committed; see ``outbox.write``)."""
        if self.outgoing:
            outgoing, self.outgoing = self.outgoing, []
            try:
                await write(await self.connection(), self.database, outgoing, notify=notify)
            except Exception as exc:
                raise explained(exc, self.database, "write to the outbox") from exc
            self.wrote = True

    async def claim(self, message_id: str, handler: str) -> bool:
        """Record ``handler`` applying ``message_id`` in the inbox; False: it did already."""
        try:
            return await claim(await self.connection(), self.database, message_id, handler)
        except Exception as exc:
            raise explained(exc, self.database, "record the message in the inbox") from exc


def explained(exc: Exception, database: Database, doing: str) -> Exception:
    """``exc`` from the driver, or an iambus error saying what to do about it."""
    name = type(exc).__name__
    if name == "UndefinedTableError":
        return ImproperlyConfigured(
            f"cannot {doing}: {exc}. Create iambus's tables ({database.outbox}, "
            f"{database.inbox}) with `iambus db init`, or Database.ddl() in your migrations"
        )
    if name in ("InFailedSQLTransactionError", "PendingRollbackError"):
        return TransactionFailed(
            f"cannot {doing}: the unit of work's transaction had failed already (a "
            f"statement in it raised, and the error was caught): nothing of it can commit. "
            f"Let the error end the unit (it rolls back), or roll back to a savepoint "
            f"(session.begin_nested() / connection.transaction()) around what may fail"
        )
    return exc


class Scope:
    """``async with``: a unit of work open on ``session`` (None: a new one of the
    database's), the current one until the block ends. See the module's docstring."""

    __slots__ = (
        "_later",
        "_made",
        "_owns",
        "_token",
        "_tx",
        "database",
        "owner",
        "remote",
        "session",
        "unit",
    )

    def __init__(
        self,
        owner: Owner,
        database: Database,
        remote: object,
        session: Any = None,
        *,
        later: list[Later] | None = None,
    ):
        if session is not None:
            check_handle(session)
        self.owner = owner
        self.database = database
        self.remote = remote
        self.session = session
        self.unit: UnitOfWork | None = None
        # Where the in-process work left to the commit goes: run at the end of the block,
        # or (a handler's unit) handed to the route, to run after its middleware.
        self._later = later
        self._made: Any = None  # the context manager of a session made here
        self._owns = False
        self._tx: Any = None
        self._token: contextvars.Token[UnitOfWork | None] | None = None

    async def __aenter__(self) -> UnitOfWork:
        session = self.session
        if session is None:
            self._made = self.database.session()
            session = await self._made.__aenter__()
        try:
            if not in_transaction(session):
                self._owns = True
                if _is_sqlalchemy(session):
                    await session.begin()
                else:
                    self._tx = session.transaction()
                    await self._tx.start()
        except BaseException:
            await self._release(None)
            raise
        self.unit = UnitOfWork(self.owner, self.database, self.remote, session)
        self._token = current_unit.set(self.unit)
        self.owner.units += 1
        return self.unit

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        unit = self.unit
        assert unit is not None
        assert self._token is not None
        current_unit.reset(self._token)
        self.owner.units -= 1
        failed = exc
        try:
            if exc is None:
                # A unit that commits wakes the relays after its commit; one that joined
                # the caller's transaction has its NOTIFY delivered at the caller's.
                await unit.flush(notify=not self._owns)
                if self._owns:
                    await self._commit(unit.session)
                    if unit.wrote:
                        self.database.notify_relays()
        except BaseException as error:
            failed = error
            raise
        finally:
            try:
                if failed is not None and self._owns:
                    await self._rollback(unit.session)
            finally:
                await self._release(failed)
        if self._later is not None:
            self._later.extend(unit.later)
            return
        for work in unit.later:  # committed: what was handled in-process runs now
            try:
                await work()
            except Exception:
                logger.exception("iambus: in-process work sent in a unit of work failed")

    async def _commit(self, session: Any) -> None:
        if _is_sqlalchemy(session):
            await session.commit()
        else:
            await self._tx.commit()

    async def _rollback(self, session: Any) -> None:
        try:
            if _is_sqlalchemy(session):
                await session.rollback()
            else:
                await self._tx.rollback()
        except Exception:  # the connection may be gone: the server has rolled it back
            logger.debug("iambus: rolling back a unit of work failed", exc_info=True)

    async def _release(self, exc: BaseException | None) -> None:
        made, self._made = self._made, None
        if made is not None:
            # With its traceback: a context manager given none sets the error's to None,
            # and the handler's frames would be lost from what the worker logs.
            tb = exc.__traceback__ if exc else None
            await made.__aexit__(type(exc) if exc else None, exc, tb)


def current_session() -> Any:
    """The session (or connection) of the unit of work running now."""
    unit = current_unit.get()
    if unit is None:
        raise ImproperlyConfigured(
            "a handler asked for the unit of work's session outside a unit of work; run it "
            "in one (register(..., unit_of_work=True), or Dispatcher(unit_of_work=True))"
        )
    return unit.session


async def current_connection() -> Any:
    """The asyncpg connection of the unit of work running now."""
    unit = current_unit.get()
    if unit is None:
        current_session()  # raises, saying why
    assert unit is not None
    return await unit.connection()


Session = Factory(current_session, name="iambus.unit_of_work.Session")
"""Bind as ``register(Msg, session=Session)``: the unit of work's ``AsyncSession``."""

Connection = Factory(current_connection, name="iambus.unit_of_work.Connection")
"""Bind as ``register(Msg, conn=Connection)``: the unit of work's asyncpg connection."""


# -- which handler parameters get the session --------------------------------------------

_SESSION_TYPES = {"sqlalchemy.ext.asyncio.session.AsyncSession": Session}
_CONNECTION_TYPES = {
    "asyncpg.connection.Connection": Connection,
    "asyncpg.pool.PoolConnectionProxy": Connection,
}
_BY_NAME = {"AsyncSession": Session, "asyncpg.Connection": Connection}


def providers_for(fn: Any, taken: set[str]) -> dict[str, Factory]:
    """The parameters of ``fn`` (not in ``taken``) typed as a session or an asyncpg
    connection, with the provider that gives them the unit's. Reads annotations only; a
    string annotation that cannot be resolved counts by its name (``AsyncSession``,
    ``asyncpg.Connection``)."""
    target: Any = fn
    if isinstance(fn, type):
        target = typing.cast(Any, fn).__init__  # a class gets its arguments at __init__
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    hints: dict[str, Any] = {}
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: its text is read instead
        hints = {}
    found: dict[str, Factory] = {}
    for name, param in sig.parameters.items():
        if name in taken or name == "self":
            continue
        annotation = hints.get(name, param.annotation)
        provider = _provider_of(annotation)
        if provider is not None:
            found[name] = provider
    return found


def _provider_of(annotation: Any) -> Factory | None:
    if isinstance(annotation, str):
        return _BY_NAME.get(annotation.strip())
    if not isinstance(annotation, type):
        return None
    for cls in annotation.__mro__:
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        provider = _SESSION_TYPES.get(qualified) or _CONNECTION_TYPES.get(qualified)
        if provider is not None:
            return provider
    return None


def _is_sqlalchemy(session: Any) -> bool:
    return type(session).__module__.startswith("sqlalchemy")


def check_handle(session: Any) -> None:
    """Refuse what is neither an ``AsyncSession`` nor an asyncpg connection."""
    module = type(session).__module__
    if module.startswith("sqlalchemy") and hasattr(session, "sync_session"):
        return
    if module.startswith("asyncpg") and hasattr(session, "is_in_transaction"):
        return
    raise ImproperlyConfigured(
        f"dp.unit_of_work() takes a SQLAlchemy AsyncSession or an asyncpg connection, got "
        f"{session!r}"
    )


def in_transaction(session: Any) -> bool:
    if _is_sqlalchemy(session):
        return bool(session.in_transaction())
    return bool(session.is_in_transaction())
