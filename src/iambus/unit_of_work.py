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
transport is retried as always). On a delivery from a transport (a command or an event),
the unit first records the envelope id with the handler's subscription in the inbox
(``inbox``): a redelivery whose record exists is acked without running the handler again.

``execute()`` and ``query()`` of an in-process handler run at once, inside the unit, with
a key too (a handler of theirs that takes a session gets the same one, and joins the same
unit). A
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
caller; in-process messages are handled once that commit is done (SQLAlchemy's
``after_commit``), and refused on an asyncpg connection (nothing tells when it commits).
A block opened inside a unit of the same dispatcher is part of it. A unit ends with its
block: a task that outlives it finds no unit.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import types
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .database import Database
from .envelope import Envelope
from .errors import ImproperlyConfigured, TransactionFailed
from .inbox import claim, claim_again, keep_answer, kept_answer
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
    units open on it, so that while none is, its sends skip looking for one, and holds
    the in-process work a commit of a caller's SQLAlchemy transaction set running (its
    dispatcher's ``join()`` and ``stop()`` wait for it)."""

    units: int
    committed: set[asyncio.Task[None]]


class UnitOfWork:
    """One open transaction and what was sent in it (see the module's docstring)."""

    __slots__ = (
        "_claimed",
        "_raw",
        "closed",
        "database",
        "later",
        "no_later",
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
        # Set once the block ended: a task started inside it that outlives it (an engine
        # worker, a task of the handler's) finds no unit there any more.
        self.closed = False
        # Why in-process work cannot wait for this unit's commit (a joined asyncpg
        # transaction: nothing tells when the caller commits), or None.
        self.no_later: str | None = None
        self._claimed: set[tuple[str, str]] = set()
        self.wrote = False  # outbox rows were written
        self._raw: Any = None if _is_sqlalchemy(session) else session

    async def connection(self) -> Any:
        """The asyncpg connection the transaction runs on (for a SQLAlchemy session, the
        driver connection under it: SQL on it joins the session's transaction)."""
        if self._raw is None:
            # One hop into SQLAlchemy's greenlet (11 µs) instead of two awaits (31 µs).
            self._raw = await self.session.run_sync(_driver_connection)
        return self._raw

    def send(self, address: str, envelope: Envelope) -> None:
        """Collect a routed message: written to the outbox when the unit flushes."""
        if self.closed:  # only through a unit kept after its block: see open_unit()
            raise TransactionFailed(
                f"cannot send {envelope.name} into a unit of work that has ended (its "
                f"transaction committed or rolled back): send it inside the block, or with "
                f"dp.send() after it"
            )
        self.outgoing.append(Outgoing(address, envelope))

    def after_commit(self, work: Later) -> None:
        """Run ``work`` (in-process handling) once the unit has committed."""
        if self.no_later is not None:
            raise ImproperlyConfigured(self.no_later)
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

    async def check_not_failed(self) -> None:
        """Raise ``TransactionFailed`` when a statement of the unit's transaction failed
        (its error caught): PostgreSQL answers the commit of an aborted transaction with a
        rollback, and no error. (One statement: a unit that wrote outbox rows has just
        found out, and needs none.)"""
        try:
            conn = self._raw
            if conn is None:  # a session iambus wrote nothing on: SQLAlchemy's own, if any
                conn = await self.session.run_sync(_driver_of)
            # (nothing ran in a transaction yet: none failed)
            if conn is not None and conn.is_in_transaction():
                await conn.execute("SELECT 1")
        except Exception as exc:
            raise explained(exc, self.database, "commit the unit of work") from exc

    async def claim(self, message_id: str, handler: str) -> bool:
        """Record ``handler`` applying ``message_id`` in the inbox; False: it did already
        (in an earlier transaction: a claim made in this one is this attempt's own, as
        when a middleware runs the handler again inside one unit, made again if a
        savepoint rolled it back)."""
        again = (message_id, handler) in self._claimed
        try:
            conn = await self.connection()
            if again:  # (a savepoint may have rolled the first claim back)
                return await claim_again(conn, self.database, message_id, handler)
            new = await claim(conn, self.database, message_id, handler)
        except Exception as exc:
            raise explained(exc, self.database, "record the message in the inbox") from exc
        if new:
            self._claimed.add((message_id, handler))
        return new

    async def keep_answer(self, message_id: str, handler: str, answer: tuple[bytes, str]) -> None:
        """Keep ``answer`` (payload, content type) in the inbox record this unit claimed
        for ``message_id``: a redelivery the record skips is answered with it. Nothing
        with an inbox of the earlier shape (see ``Database.answers_kept``)."""
        try:
            conn = await self.connection()
            if await self.database.answers_kept(conn):
                await keep_answer(conn, self.database, message_id, handler, answer)
        except Exception as exc:
            raise explained(exc, self.database, "keep the answer in the inbox") from exc

    async def kept_answer(self, message_id: str, handler: str) -> tuple[bytes, str] | None:
        """The answer kept with an earlier run's inbox record of ``message_id``, if any."""
        try:
            conn = await self.connection()
            if not await self.database.answers_kept(conn):
                return None
            return await kept_answer(conn, self.database, message_id, handler)
        except Exception as exc:
            raise explained(exc, self.database, "read the answer kept in the inbox") from exc


def _driver_of(session: Any) -> Any:
    """The asyncpg connection under a (sync) SQLAlchemy session, as it is; None when the
    session holds none (nothing used it: asking for one would take one of the pool's,
    waiting for it while all are busy)."""
    transaction = session.get_transaction()
    # (SessionTransaction.connections, public from SQLAlchemy 2.1.7, reads this dict)
    if transaction is None or not transaction._connections:
        return None
    return session.connection().connection.driver_connection


def _driver_connection(session: Any) -> Any:
    """The asyncpg connection under a (sync) SQLAlchemy session's transaction, in that
    transaction: SQLAlchemy's asyncpg adapter begins it on the driver connection only at
    its first statement, and until then iambus's statements there would each commit on
    their own (an inbox record kept by a rollback, outbox rows sent for one)."""
    connection = session.connection()
    driver = connection.connection.driver_connection
    if not driver.is_in_transaction():
        connection.exec_driver_sql("SELECT 1")  # (nothing begins on an autocommit engine)
    return driver


def open_unit(owner: object) -> UnitOfWork | None:
    """The unit of work of ``owner`` (a route table) open where this is called, if any."""
    unit = current_unit.get()
    return unit if unit is not None and unit.owner is owner and not unit.closed else None


def unit_of(remote: object) -> UnitOfWork | None:
    """The open unit of work whose outbox ``remote``'s routed sends go to, if any."""
    unit = current_unit.get()
    return unit if unit is not None and unit.remote is remote and not unit.closed else None


def explained(exc: Exception, database: Database, doing: str) -> Exception:
    """``exc`` from the driver, or an iambus error saying what to do about it."""
    name = type(exc).__name__
    if name == "UndefinedTableError":
        return ImproperlyConfigured(
            f"cannot {doing}: {exc}. Create iambus's tables ({database.outbox}, "
            f"{database.inbox}) with `iambus db init`, or Database.ddl() in your migrations"
        )
    if name == "UndefinedColumnError":
        return ImproperlyConfigured(
            f"cannot {doing}: {exc}. iambus's tables ({database.outbox}, {database.inbox}) "
            f"are of another version's shape: compare them with Database.ddl() and migrate "
            f"them (`iambus db init` adds the inbox's answer columns)"
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
    database's), the current one until the block ends. See the module's docstring.

    Opened where a unit of the same dispatcher is open already, on no session or on that
    unit's own, it joins it: the block is part of the outer unit (no transaction of its
    own, no commit; its sends and in-process work go to the outer unit)."""

    __slots__ = (
        "_joined",
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
        self._joined = False  # part of an outer unit of the same dispatcher
        self._tx: Any = None
        self._token: contextvars.Token[UnitOfWork | None] | None = None

    async def __aenter__(self) -> UnitOfWork:
        outer = open_unit(self.owner)
        if outer is not None and (self.session is None or self.session is outer.session):
            self._joined = True
            self.unit = outer
            return outer
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
        if not self._owns and not _is_sqlalchemy(session):
            self.unit.no_later = (
                "in-process work (an in-process event's handlers, handle() without "
                "waiting) cannot wait for the commit of an asyncpg transaction the unit of "
                "work joined: nothing tells iambus when you commit it, and run before, it "
                "would see none of the transaction's writes and could wait on its locks. "
                "Let dp.unit_of_work(conn) begin the transaction (call it on a connection "
                "not in one), use a SQLAlchemy AsyncSession, or send the work after the commit"
            )
        self._token = current_unit.set(self.unit)
        self.owner.units += 1
        return self.unit

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        unit = self.unit
        assert unit is not None
        if self._joined:
            return  # the outer unit writes, commits and runs what this block left to it
        assert self._token is not None
        unit.closed = True
        failed = exc
        try:
            try:
                current_unit.reset(self._token)
            finally:
                self.owner.units -= 1
            if exc is None:
                # A unit that commits wakes the relays after its commit; one that joined
                # the caller's transaction has its NOTIFY delivered at the caller's.
                await unit.flush(notify=not self._owns)
                if self._owns:
                    await self._commit(unit)
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
        if failed is not None or not unit.later:
            return  # rolled back (or left to the caller, who did): its work is dropped
        if not self._owns:  # joined a SQLAlchemy transaction: its work waits for its commit
            _after_commit_of(unit.session, unit.later, self.owner.committed)
            return
        if self._later is not None:
            self._later.extend(unit.later)
            return
        await run_later(unit.later)

    async def _commit(self, unit: UnitOfWork) -> None:
        """Commit; ``TransactionFailed`` if a statement whose error the handler caught had
        aborted the transaction (PostgreSQL answers the ``COMMIT`` of an aborted
        transaction with a rollback, and no error: the writes would be lost unseen)."""
        reading = None if _is_sqlalchemy(unit.session) else _commit_reader(self._tx)
        if reading is None:
            # One statement more finds out (an outbox row written found out already).
            if not unit.wrote:
                await unit.check_not_failed()
            if _is_sqlalchemy(unit.session):
                await unit.session.commit()
            else:
                await self._tx.commit()
            return
        try:
            status = await reading()
        finally:
            self._tx = None  # its COMMIT went out: nothing left to roll back
        if status != "COMMIT":
            raise TransactionFailed(
                f"cannot commit the unit of work: its transaction had failed already (a "
                f"statement in it raised, and the error was caught), and PostgreSQL rolled "
                f"it back at the commit ({status}): none of its writes were kept. Let the "
                f"error end the unit (it rolls back and the delivery is retried), or roll "
                f"back to a savepoint (connection.transaction() / session.begin_nested()) "
                f"around what may fail"
            )

    async def _rollback(self, session: Any) -> None:
        try:
            if _is_sqlalchemy(session):
                await session.rollback()
            elif self._tx is not None:
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


def _commit_reader(tx: Any) -> Callable[[], Awaitable[str]] | None:
    """A commit of the asyncpg transaction ``tx`` that returns the ``COMMIT``'s status
    (``ROLLBACK`` for an aborted transaction), or None where ``tx`` is not as this
    knows it.

    asyncpg's ``Transaction.commit()`` drops that status; finding an aborted transaction
    out otherwise costs a round trip per unit of work (a ``SELECT 1`` before the
    commit: 1.04x → 1.2x the direct handler for a unit without events). So the
    ``COMMIT`` is sent here, and the transaction left in the state asyncpg's own commit
    leaves it in (its private ``_state``, and the connection's ``_top_xact``, as in
    asyncpg 0.29 to 0.32); a later asyncpg whose transaction differs gets the round trip.
    """
    try:
        from asyncpg.transaction import TransactionState

        conn = tx._connection
        if tx._nested or tx._state is not TransactionState.STARTED or conn._top_xact is not tx:
            return None
        states = (TransactionState.COMMITTED, TransactionState.ROLLEDBACK)
    except (ImportError, AttributeError):
        return None

    async def commit() -> str:
        conn._top_xact = None
        try:
            status = str(await conn.execute("COMMIT;"))
        except BaseException:
            tx._state = TransactionState.FAILED
            raise
        tx._state = states[0] if status == "COMMIT" else states[1]
        return status

    return commit


async def run_later(later: list[Later]) -> None:
    """Run the in-process work of a committed unit; a failure is logged, not raised (the
    unit committed: its caller succeeded)."""
    for work in later:
        try:
            await work()
        except Exception:
            logger.exception("iambus: in-process work sent in a unit of work failed")


def _after_commit_of(session: Any, later: list[Later], tasks: set[asyncio.Task[None]]) -> None:
    """Run ``later`` once the transaction ``session`` is in commits (SQLAlchemy's
    session events), as a task held in ``tasks`` until it ran; drop it if the
    transaction ends otherwise (rollback, close)."""
    from sqlalchemy import event

    sync = session.sync_session
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # the unit is no longer current here
    committed = ended = False

    def on_commit(_: Any) -> None:
        nonlocal committed
        if not sync.in_nested_transaction():  # a savepoint's release is no commit
            committed = True

    def on_end(_: Any, transaction: Any) -> None:
        nonlocal ended
        if ended or transaction.parent is not None:
            return
        ended = True
        loop.call_soon(forget)  # not while SQLAlchemy iterates over its listeners
        if committed:
            task = loop.create_task(run_later(later), context=context)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def forget() -> None:
        event.remove(sync, "after_commit", on_commit)
        event.remove(sync, "after_transaction_end", on_end)

    event.listen(sync, "after_commit", on_commit)
    event.listen(sync, "after_transaction_end", on_end)


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
        return _BY_NAME.get(_without_none(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        # Optional[AsyncSession], asyncpg.Connection | None: the one session type in it.
        found = {_provider_of(arg) for arg in typing.get_args(annotation)} - {None}
        return found.pop() if len(found) == 1 else None
    if not isinstance(annotation, type):
        return None
    for cls in annotation.__mro__:
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        provider = _SESSION_TYPES.get(qualified) or _CONNECTION_TYPES.get(qualified)
        if provider is not None:
            return provider
    return None


def _without_none(text: str) -> str:
    """``"AsyncSession"`` of ``"AsyncSession | None"`` or ``"Optional[AsyncSession]"``."""
    text = text.strip()
    if text.startswith("Optional[") and text.endswith("]"):
        return text[len("Optional[") : -1].strip()
    parts = [part.strip() for part in text.split("|")]
    named = [part for part in parts if part != "None"]
    return named[0] if len(named) == 1 else text


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
