"""What runs and what waits, per service and group: ``await iambus.status(transport)``.

The command line's ``iambus status --transport URL`` prints it. For every group a worker
ever announced (see ``iambus.transports.Registry``), and every group with dead letters:

* the live instances consuming it (from the transport's registry);
* from the broker (``iambus.transports.Monitor``): how many envelopes *wait* for the group
  (stored, not yet delivered: its lag), are *in flight* (delivered to a consumer, not yet
  settled) and wait out a *retry*'s delay; None where the broker cannot tell
  (``docs/cli.md`` says what each number means on each broker);
* how many *dead letters* it has (``iambus.transports.DeadLetterStore``; None without).

::

    from iambus import status
    from iambus.transports import connect

    transport = connect("redis://127.0.0.1:6379/0?namespace=shop")
    await transport.open()
    for group in (await status(transport)).groups:
        print(group.service, group.group, group.address, group.waiting, group.dead)
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

from .errors import ImproperlyConfigured
from .transports import (
    Backlog,
    DeadLetterCounter,
    DeadLetterStore,
    Instance,
    Monitor,
    Registry,
    Transport,
)

__all__ = ["GroupStatus", "Status", "status"]

UNKNOWN = Backlog(waiting=None, in_flight=None, retrying=None)


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """One group on one address: who consumes it and what it has in the broker."""

    service: str
    address: str
    group: str
    instances: tuple[Instance, ...]
    """The live instances consuming this group."""
    waiting: int | None
    """Stored and not yet delivered to a consumer of the group (its lag)."""
    in_flight: int | None
    """Delivered to a consumer and not yet settled."""
    retrying: int | None
    """Waiting out a retry's delay."""
    dead: int | None
    """Dead letters of this group (not replayed nor purged); None when the transport keeps
    none that iambus can read (no ``DeadLetterStore``)."""


@dataclass(frozen=True, slots=True)
class Status:
    """Everything ``status`` found: the live instances, and each group."""

    url: str
    instances: tuple[Instance, ...]
    groups: tuple[GroupStatus, ...]
    """Ordered by service, then group, then address."""


async def status(transport: Transport, *, service: str | None = None) -> Status:
    """The live instances and each group's numbers on the (opened) ``transport``.

    With ``service``, only that service's groups and instances: the broker is asked
    about none of the others' (how ``iambus worker --metrics-port`` reads its gauges).
    """
    if not isinstance(transport, Registry):
        raise ImproperlyConfigured(
            f"{transport.url}: {type(transport).__name__} keeps no registry of instances "
            f"(iambus.transports.Registry), so status cannot tell which groups exist"
        )
    live = await transport.instances()
    known = await transport.groups()
    for instance in live:
        for consumed in instance.consumes:
            known.setdefault(consumed, instance.service)
    dead: Counter[tuple[str, str]] | None = None
    if isinstance(transport, DeadLetterCounter):
        dead = Counter(await transport.dead_letter_counts())
    elif isinstance(transport, DeadLetterStore):  # without the count: every one is read
        letters = await transport.dead_letters(limit=sys.maxsize)
        dead = Counter((letter.address, letter.group) for letter in letters)
    for address, group in dead or ():
        # A group no instance announced (an older worker): its service is what a
        # worker's group name starts with ("<service>" or "<service>.<handler>").
        known.setdefault((address, group), group.partition(".")[0])
    if service is not None:
        live = [i for i in live if i.service == service]
        known = {where: owner for where, owner in known.items() if owner == service}
    groups: list[GroupStatus] = []
    for (address, group), owner in known.items():
        backlog = (
            await transport.backlog(address, group) if isinstance(transport, Monitor) else UNKNOWN
        )
        groups.append(
            GroupStatus(
                service=owner,
                address=address,
                group=group,
                instances=tuple(i for i in live if (address, group) in i.consumes),
                waiting=backlog.waiting,
                in_flight=backlog.in_flight,
                retrying=backlog.retrying,
                dead=None if dead is None else dead[address, group],
            )
        )
    groups.sort(key=lambda g: (g.service, g.group, g.address))
    instances = sorted(live, key=lambda i: (i.service, i.started, i.id))
    return Status(url=transport.url, instances=tuple(instances), groups=tuple(groups))
