"""A small library service, in-process: the seed's books example, working.

    python examples/books.py

A string event on start-up, a command that stores a book through a Singleton-provided
storage and returns an event, an event handler reacting to it, and a query whose result
is printed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from iambus import Command, Query, Singleton
from iambus import dispatcher as dp


@dataclass(frozen=True, slots=True)
class Book:
    title: str
    author: str
    year: int


@dataclass(frozen=True, slots=True)
class CreateBook(Command[Book]):
    title: str
    author: str
    year: int


@dataclass(frozen=True, slots=True)
class BookCreated:
    book: Book


@dataclass(frozen=True, slots=True)
class BookQuery(Query[list[Book]]):
    title: str


async def get_storage() -> dict[str, Book]:
    # An async provider: awaited once, on first use, never by blocking the loop.
    print("storage: created")
    return {}


storage: Singleton = Singleton["storage":get_storage]  # annotated: not a type alias


@dp.events.register("on startup")
async def on_startup() -> None:
    print("on startup: library service ready")


@dp.commands.register(CreateBook, response_event=BookCreated, storage=storage)
async def create_book(command: CreateBook, storage: dict[str, Book]) -> BookCreated:
    book = Book(command.title, command.author, command.year)
    storage[book.title] = book
    print(f"create_book: stored {book.title!r}")
    return BookCreated(book)  # published once this handler has succeeded


@dp.events.register(BookCreated)
async def announce(event: BookCreated) -> None:
    print(f"announce: new book {event.book.title!r} by {event.book.author}")


@dp.queries.register(BookQuery, storage=storage)
async def find_books(query: BookQuery, storage: dict[str, Book]) -> list[Book]:
    return [book for title, book in storage.items() if title == query.title]


async def main() -> None:
    async with dp:  # starts the dispatcher; on exit, drains background work
        await dp.handle("on startup")  # queued for a background worker
        await dp.join()  # wait for it, so the output reads in order
        await dp.execute(CreateBook("Philosopher's Stone", "J. K. Rowling", 1997))
        books = await dp.query(BookQuery("Philosopher's Stone"))
        print(f"query: found {books}")


if __name__ == "__main__":
    asyncio.run(main())
