"""JsonCodec: round trips for every supported type, the wire format, and every error path.

The module uses ``from __future__ import annotations`` on purpose: the codec must read
string annotations through ``typing.get_type_hints``.
"""

from __future__ import annotations

import enum
import json
import subprocess
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Generic, Literal, NewType, TypeVar
from uuid import UUID

import pytest

from iambus.codecs import Codec, JsonCodec
from iambus.errors import SerializationError

codec = JsonCodec()

UserId = NewType("UserId", int)
T = TypeVar("T")
N = TypeVar("N", bound=int)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Size(enum.StrEnum):
    S = "s"
    M = "m"


class Perm(enum.Flag):
    READ = 1
    WRITE = 2


class Email(str):
    pass


@dataclass(frozen=True, slots=True)
class Line:
    sku: str
    qty: int
    price: Decimal


@dataclass(frozen=True, slots=True)
class OrderPlaced:
    order_id: UUID
    placed_at: datetime
    lines: list[Line]
    note: str | None = None
    tags: frozenset[str] = frozenset()


@dataclass
class Defaults:
    name: str
    count: int = 3
    labels: list[str] = field(default_factory=list)
    computed: int = field(init=False, default=0)


@dataclass(frozen=True)
class Point:
    x: float
    y: float


@dataclass(frozen=True)
class Tree:
    value: int
    children: list[Tree] = field(default_factory=list)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    first: T | None = None


@dataclass(frozen=True)
class Bounded(Generic[N]):
    value: N


@dataclass(frozen=True)
class Loose:
    payload: Any
    meta: dict
    rows: list


@dataclass(frozen=True)
class Card:
    kind: Literal["card"]
    number: str


@dataclass(frozen=True)
class Cash:
    kind: Literal["cash"]
    amount: Decimal


@dataclass(frozen=True)
class Payment:
    method: Card | Cash


@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class One:
    only: int


@dataclass(frozen=True)
class Positive:
    amount: int

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError("amount must be positive")


@dataclass
class Mutable:  # eq without frozen: unhashable
    n: int


class Customer:  # a plain class: neither a dataclass nor a model
    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(frozen=True)
class Order:
    customer: Customer


@dataclass(frozen=True)
class CountedHints:
    n: int


def roundtrip(value: Any, into: Any) -> Any:
    return codec.decode(codec.encode(value), into, name="Msg")


UID = UUID("12345678-1234-5678-1234-567812345678")
ORDER = OrderPlaced(
    order_id=UID,
    placed_at=datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    lines=[Line("BOOK-1", 2, Decimal("12.50")), Line("PEN-7", 1, Decimal("0.10"))],
    tags=frozenset({"gift"}),
)


@pytest.mark.parametrize(
    ("value", "into"),
    [
        ("on startup", str),
        ("", str),
        ("żółw ☃", str),
        (None, None),
        (None, type(None)),
        (7, int),
        (-(2**70), int),
        (1.5, float),
        (True, bool),
        (False, bool),
        (Decimal("12345678901234567890.000000000000000001"), Decimal),
        (Decimal("-0.00"), Decimal),
        (Decimal("1E+3"), Decimal),
        (UID, UUID),
        (datetime(2024, 1, 2, 3, 4, 5, 678901), datetime),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), datetime),
        (date(2024, 2, 29), date),
        (time(23, 59, 1, 5), time),
        (time(8, 0, tzinfo=timezone(timedelta(hours=-3))), time),
        (b"\x00\xffbinary", bytes),
        (b"", bytes),
        (Color.GREEN, Color),
        (Level.HIGH, Level),
        (Size.M, Size),
        (Perm.READ | Perm.WRITE, Perm),
        ("card", Literal["card", "cash"]),
        (2, Literal[1, 2]),
        (Color.RED, Literal[Color.RED]),
        (UserId(5), UserId),
        (Email("a@b.c"), Email),
        ([1, 2, 3], list[int]),
        ([], list[str]),
        ((1, 2, 3), tuple[int, ...]),
        ((1, "a", None), tuple[int, str, None]),
        ((), tuple[()]),
        ({"a", "b"}, set[str]),
        (frozenset({1, 2}), frozenset[int]),
        ({"a": 1}, dict[str, int]),
        ({1: "one", -2: "minus two"}, dict[int, str]),
        ({UID: Line("x", 1, Decimal(1))}, dict[UUID, Line]),
        ({Color.RED: 1}, dict[Color, int]),
        ({Level.LOW: "low"}, dict[Level, str]),
        ({UserId(1): True}, dict[UserId, bool]),
        ({"a": 1}, dict[Literal["a", "b"], int]),
        ({"x": [1, {"y": None}]}, dict[str, Any]),
        ({"x": [1, {"y": None}]}, Any),
        ([1, "a"], list),
        ({"k": "v"}, dict),
        ((1, "a"), tuple),
        ({1}, set),
        (frozenset({"z"}), frozenset),
        ([1, 2], Sequence[int]),
        ({"a": 2}, Mapping[str, int]),
        ([1, 2], typing.List[int]),  # noqa: UP006
        ((1, 2), typing.Tuple),  # noqa: UP006
        (5, Annotated[int, "meta"]),
        (None, int | None),
        (None, int | str | None),
        (4, int | None),
        (4, typing.Optional[int]),  # noqa: UP045
        ("x", int | str),
        (ORDER, OrderPlaced),
        (ORDER, OrderPlaced | None),
        ([ORDER, ORDER], list[OrderPlaced]),
        (Defaults("n", 1, ["a"]), Defaults),
        (Point(1.0, -2.5), Point),
        (Tree(1, [Tree(2, [Tree(3)]), Tree(4)]), Tree),
        (Page([Line("a", 1, Decimal(1))], 1, Line("b", 2, Decimal(2))), Page[Line]),
        (Page([1, 2], 2), Page[int]),
        (Page(["raw"], 1), Page),
        (Bounded(3), Bounded),
        (Loose({"any": [1]}, {"m": 1}, [1, "x"]), Loose),
        (Payment(Cash("cash", Decimal("9.99"))), Payment),
        (Payment(Card("card", "4242")), Payment),
        (Empty(), Empty),
        (One(1), One),
    ],
    ids=repr,
)
def test_round_trip(value: Any, into: Any) -> None:
    result = roundtrip(value, into)
    assert result == value
    assert type(result) is type(value)


def test_round_trip_twice_uses_the_same_result() -> None:
    # The second decode runs from the cached plan: it must give the same answer.
    body = codec.encode(ORDER)
    assert codec.decode(body, OrderPlaced, name="OrderPlaced") == ORDER
    assert codec.decode(body, OrderPlaced, name="OrderPlaced") == ORDER


def test_wire_format_of_each_special_type() -> None:
    @dataclass
    class Everything:
        at: datetime
        day: date
        clock: time
        uid: UUID
        price: Decimal
        blob: bytes
        color: Color
        level: Level
        tags: set[str]
        pair: tuple[int, str]
        by_id: dict[UUID, int]
        maybe: int | None

    value = Everything(
        at=datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2))),
        day=date(2024, 5, 1),
        clock=time(9, 15),
        uid=UID,
        price=Decimal("12.50"),
        blob=b"hi",
        color=Color.RED,
        level=Level.HIGH,
        tags={"a"},
        pair=(1, "x"),
        by_id={UID: 3},
        maybe=None,
    )
    assert json.loads(codec.encode(value)) == {
        "at": "2024-05-01T12:30:00+02:00",
        "day": "2024-05-01",
        "clock": "09:15:00",
        "uid": "12345678-1234-5678-1234-567812345678",
        "price": "12.50",
        "blob": "aGk=",
        "color": "red",
        "level": 2,
        "tags": ["a"],
        "pair": [1, "x"],
        "by_id": {"12345678-1234-5678-1234-567812345678": 3},
        "maybe": None,
    }


def test_encoding_is_compact_utf8_json() -> None:
    assert codec.encode(Line("żółw", 1, Decimal("2"))) == (
        '{"sku":"żółw","qty":1,"price":"2"}'.encode()
    )
    assert codec.encode("on startup") == b'"on startup"'
    assert codec.encode(None) == b"null"


def test_encode_writes_every_field_including_init_false() -> None:
    assert json.loads(codec.encode(Defaults("n"))) == {
        "name": "n",
        "count": 3,
        "labels": [],
        "computed": 0,
    }


def test_timezone_offset_is_kept_and_naive_stays_naive() -> None:
    aware = roundtrip(ORDER, OrderPlaced).placed_at
    assert aware.utcoffset() == timedelta(hours=5, minutes=30)
    assert aware.hour == 12
    naive = roundtrip(datetime(2024, 1, 1, 8), datetime)
    assert naive.tzinfo is None
    assert codec.decode(b'"2024-01-01T08:00:00Z"', datetime, name="At").tzinfo == UTC


def test_decimal_is_exact_and_written_as_a_string() -> None:
    exact = Decimal("0.1000000000000000000000000001")
    assert codec.encode(exact) == b'"0.1000000000000000000000000001"'
    assert roundtrip(exact, Decimal) == exact
    assert roundtrip(exact, Decimal).as_tuple() == exact.as_tuple()
    assert codec.decode(b"10", Decimal, name="Price") == Decimal(10)  # an integer is exact too


def test_missing_fields_take_their_defaults() -> None:
    first = codec.decode(b'{"name":"n"}', Defaults, name="Defaults")
    second = codec.decode(b'{"name":"n"}', Defaults, name="Defaults")
    assert first == Defaults("n", 3, [])
    assert first.labels is not second.labels  # default_factory runs for each message


def test_init_false_fields_in_the_payload_are_not_passed_to_init() -> None:
    body = b'{"name":"n","computed":99}'
    assert codec.decode(body, Defaults, name="Defaults").computed == 0


def test_unknown_fields_are_ignored() -> None:
    body = b'{"sku":"a","qty":1,"price":"1","added_in_v2":{"x":1}}'
    assert codec.decode(body, Line, name="Line") == Line("a", 1, Decimal("1"))


def test_an_int_is_accepted_for_a_float() -> None:
    point = codec.decode(b'{"x":1,"y":2.5}', Point, name="Point")
    assert point == Point(1.0, 2.5)
    assert type(point.x) is float


@pytest.mark.parametrize(
    ("into", "body", "expected"),
    [
        (int | float, b"3", 3),
        (float | int, b"3", 3.0),
        (int | float, b"3.5", 3.5),
        (bool | int, b"true", True),
        (int | bool, b"true", True),  # int does not take a bool, so bool gets it
        (str | UUID, b'"12345678-1234-5678-1234-567812345678"', str(UID)),
        (UUID | str, b'"12345678-1234-5678-1234-567812345678"', UID),
        (UUID | str, b'"not a uuid"', "not a uuid"),
        (datetime | None, b"null", None),
        (int | Any, b'"anything"', "anything"),
        (list[int] | dict[str, int], b'{"a":1}', {"a": 1}),
    ],
    ids=repr,
)
def test_union_members_are_tried_in_order(into: Any, body: bytes, expected: Any) -> None:
    result = codec.decode(body, into, name="Value")
    assert result == expected
    assert type(result) is type(expected)


def test_a_literal_tag_picks_the_union_member() -> None:
    body = b'{"method":{"kind":"cash","amount":"5"}}'
    assert codec.decode(body, Payment, name="Payment") == Payment(Cash("cash", Decimal(5)))


def test_codec_protocol() -> None:
    assert isinstance(JsonCodec(), Codec)
    assert JsonCodec().content_type == "application/json"
    assert repr(JsonCodec()) == "JsonCodec()"

    class Upper:
        content_type = "text/plain"

        def encode(self, value: Any) -> bytes:
            return str(value).upper().encode()

        def decode(self, data: bytes, into: Any, *, name: str) -> Any:
            return into(data.decode())

    assert isinstance(Upper(), Codec)
    assert not isinstance(object(), Codec)


def test_the_plan_is_compiled_once_per_type(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = typing.get_type_hints

    def counting(obj: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(typing, "get_type_hints", counting)
    body = codec.encode(CountedHints(1))
    assert calls == []  # encoding reads no annotations
    assert codec.decode(body, CountedHints, name="CountedHints") == CountedHints(1)
    assert calls == [CountedHints]
    assert codec.decode(body, CountedHints, name="CountedHints") == CountedHints(1)
    assert codec.decode(b'{"n":2}', CountedHints, name="CountedHints") == CountedHints(2)
    assert calls == [CountedHints]
    # A container of the type reuses the plan of the type.
    assert codec.decode(b'[{"n":3}]', list[CountedHints], name="R") == [CountedHints(3)]
    assert calls == [CountedHints]


def test_an_unhashable_type_expression_still_decodes() -> None:
    into = Annotated[int, {"unhashable": "metadata"}]
    assert codec.decode(b"5", into, name="N") == 5
    assert codec.decode(b"6", into, name="N") == 6
    assert codec.decode(b"[7]", list[into], name="N") == [7]


class Rate(enum.Enum):  # values that JSON cannot carry as they are
    LOW = Decimal("0.5")


def test_enum_values_must_be_json_values() -> None:
    assert codec.encode(Rate.LOW) == b'"0.5"'
    with pytest.raises(
        SerializationError, match=r"cannot decode R: expected Rate \(one of Decimal\('0\.5'\)\)"
    ):
        codec.decode(b'"0.5"', Rate, name="R")


def test_importing_iambus_codecs_does_not_import_pydantic_or_msgspec() -> None:
    code = (
        "import sys\n"
        "from dataclasses import dataclass\n"
        "import iambus, iambus.codecs\n"
        "@dataclass\n"
        "class M:\n"
        "    n: int\n"
        "c = iambus.codecs.JsonCodec()\n"
        "assert c.decode(c.encode(M(1)), M, name='M') == M(1)\n"
        "print(sorted({'pydantic', 'msgspec'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- pydantic and msgspec --------------------------------------------------------------


def test_pydantic_models_round_trip() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):
        city: str
        since: date

    class User(pydantic.BaseModel):
        user_id: UUID
        name: str
        joined: datetime
        balance: Decimal
        address: Address
        extra: dict[str, int] = pydantic.Field(default_factory=dict)

    user = User(
        user_id=UID,
        name="ann",
        joined=datetime(2024, 1, 1, 9, tzinfo=timezone(timedelta(hours=1))),
        balance=Decimal("10.01"),
        address=Address(city="Oslo", since=date(2020, 1, 1)),
    )
    assert roundtrip(user, User) == user
    assert roundtrip([user], list[User]) == [user]
    assert roundtrip({"u": user}, dict[str, User | None]) == {"u": user}
    wrapped = Page([user], 1)
    assert roundtrip(wrapped, Page[User]) == wrapped  # inside a dataclass
    assert json.loads(codec.encode(user))["balance"] == "10.01"


def test_pydantic_validation_errors_name_the_path() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):
        price: int

    class Basket(pydantic.BaseModel):
        items: list[Item]

    body = b'{"items":[{"price":1},{"price":2},{"price":"abc"}]}'
    with pytest.raises(
        SerializationError,
        match=r"cannot decode PutBasket\.items\[2\]\.price: Input should be a valid integer.*"
        r'got string "abc"',
    ) as caught:
        codec.decode(body, Basket, name="PutBasket")
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)

    with pytest.raises(
        SerializationError, match=r"cannot decode PutBasket\.items\[0\]\.price: Field required"
    ):
        codec.decode(b'{"items":[{}]}', Basket, name="PutBasket")

    with pytest.raises(SerializationError, match=r"\(and 1 more\)"):
        codec.decode(b'{"items":[{"price":"x"},{"price":"y"}]}', Basket, name="PutBasket")


def test_pydantic_encode_errors_are_serialization_errors() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Holder(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        customer: Customer

    with pytest.raises(
        SerializationError, match=r"cannot encode Payment\.method: pydantic cannot encode it"
    ) as caught:
        codec.encode(Payment(Holder(customer=Customer("x"))))
    assert caught.value.__cause__ is not None


def test_msgspec_structs_round_trip() -> None:
    msgspec = pytest.importorskip("msgspec")

    # defstruct: msgspec cannot resolve this module's string annotations on a local class.
    Item = msgspec.defstruct(
        "Item", [("sku", str), ("price", Decimal), ("at", datetime), ("blob", bytes)], frozen=True
    )
    Basket = msgspec.defstruct("Basket", [("basket_id", UUID), ("items", list[Item])])

    item = Item("a", Decimal("1.10"), datetime(2024, 1, 1, tzinfo=UTC), b"\x01")
    basket = Basket(UID, [item])
    assert roundtrip(basket, Basket) == basket
    assert roundtrip([item], list[Item]) == [item]
    wrapped = Page([item], 1, item)
    assert roundtrip(wrapped, Page[Item]) == wrapped  # inside a dataclass
    assert json.loads(codec.encode(item))["price"] == "1.10"


def test_msgspec_validation_errors_name_the_path() -> None:
    msgspec = pytest.importorskip("msgspec")

    Item = msgspec.defstruct("Item", [("price", int)])
    Basket = msgspec.defstruct("Basket", [("items", list[Item])])

    with pytest.raises(
        SerializationError,
        match=r"cannot decode PutBasket\.items\[1\]\.price: Expected `int`, got `str`",
    ) as caught:
        codec.decode(b'{"items":[{"price":1},{"price":"2"}]}', Basket, name="PutBasket")
    assert isinstance(caught.value.__cause__, msgspec.ValidationError)

    with pytest.raises(
        SerializationError, match=r"cannot decode PutBasket: Expected `object`, got `array`"
    ):
        codec.decode(b"[]", Basket, name="PutBasket")


def test_msgspec_encode_errors_are_serialization_errors() -> None:
    msgspec = pytest.importorskip("msgspec")

    Holder = msgspec.defstruct("Holder", [("customer", Any)])

    with pytest.raises(
        SerializationError, match=r"cannot encode list\[0\]: msgspec cannot encode it"
    ):
        codec.encode([Holder(Customer("x"))])


# --- decode errors ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    sensor: str
    value: float
    count: int
    ok: bool


def test_a_dataclass_of_plain_fields_round_trips_and_is_checked_as_any_other() -> None:
    reading = Reading("t1", 0.5, 3, True)
    body = codec.encode(reading)
    assert body == b'{"sensor":"t1","value":0.5,"count":3,"ok":true}'
    assert codec.decode(body, Reading, name="R") == reading
    # Another key (a newer producer's field) is ignored; an int where a float goes is one.
    assert codec.decode(body[:-1] + b',"new":[1]}', Reading, name="R") == reading
    taken = codec.decode(body.replace(b"0.5", b"2"), Reading, name="R")
    assert taken == Reading("t1", 2.0, 3, True)
    assert type(taken.value) is float
    with pytest.raises(SerializationError, match=r"R\.count: expected int, got boolean true$"):
        codec.decode(body.replace(b'"count":3', b'"count":true'), Reading, name="R")
    with pytest.raises(SerializationError, match=r"R\.ok: missing required field$"):
        codec.decode(body.replace(b',"ok":true', b""), Reading, name="R")
    # A value of a subclass or an enum still goes through its own encoder.
    assert codec.encode(Reading(Color.RED, 1.0, 0, False)) == (  # type: ignore[arg-type]
        b'{"sensor":"red","value":1.0,"count":0,"ok":false}'
    )


def test_decode_takes_whitespace_around_the_json() -> None:
    assert codec.decode(b' \n{"a": [1, "x"]}\t ', dict[str, Any], name="m") == {"a": [1, "x"]}
    assert codec.decode(b'{"a":1}', dict[str, int], name="m") == {"a": 1}
    assert codec.decode(b"5 ", int, name="m") == 5


def order_body(**changes: Any) -> bytes:
    payload = json.loads(codec.encode(ORDER))
    for path, value in changes.items():
        target = payload
        *parents, last = path.split("__")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is ...:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("body", "message", "cause"),
    [
        (
            order_body(lines__1__qty=...),
            r"cannot decode OrderPlaced\.lines\[1\]\.qty: missing required field$",
            None,
        ),
        (
            order_body(lines__1__qty="2"),
            r'cannot decode OrderPlaced\.lines\[1\]\.qty: expected int, got string "2"$',
            None,
        ),
        (
            order_body(lines__0__qty=True),
            r"cannot decode OrderPlaced\.lines\[0\]\.qty: expected int, got boolean true$",
            None,
        ),
        (
            order_body(lines__0__qty=2.0),
            r"cannot decode OrderPlaced\.lines\[0\]\.qty: expected int, got number 2\.0$",
            None,
        ),
        (
            order_body(lines__0__sku=None),
            r"cannot decode OrderPlaced\.lines\[0\]\.sku: expected str, got null$",
            None,
        ),
        (
            order_body(lines__0__price="12,50"),
            r"OrderPlaced\.lines\[0\]\.price: expected Decimal \(a decimal string\), "
            r'got string "12,50"$',
            InvalidOperation,
        ),
        (
            order_body(lines__0__price=1.5),
            r"OrderPlaced\.lines\[0\]\.price: expected Decimal \(a decimal string\), "
            r"got number 1\.5$",
            None,
        ),
        (
            order_body(placed_at="yesterday"),
            r"cannot decode OrderPlaced\.placed_at: expected datetime \(an ISO 8601 string\), "
            r'got string "yesterday"$',
            ValueError,
        ),
        (
            order_body(order_id="1234"),
            r'cannot decode OrderPlaced\.order_id: expected UUID \(a string\), got string "1234"$',
            ValueError,
        ),
        (
            order_body(lines={"0": {}}),
            r"cannot decode OrderPlaced\.lines: expected list\[Line\] \(an array\), "
            r"got an object$",
            None,
        ),
        (
            order_body(lines__1=[]),
            r"cannot decode OrderPlaced\.lines\[1\]: expected Line \(an object\), got an array$",
            None,
        ),
        (
            order_body(tags="gift"),
            r"cannot decode OrderPlaced\.tags: expected frozenset\[str\] \(an array\), "
            r'got string "gift"$',
            None,
        ),
        (
            order_body(note=5),
            r"cannot decode OrderPlaced\.note: expected str, got integer 5$",
            None,
        ),
        (
            b"[1, 2]",
            r"cannot decode OrderPlaced: expected OrderPlaced \(an object\), got an array$",
            None,
        ),
        (b"", r"cannot decode OrderPlaced: invalid JSON: Expecting value", json.JSONDecodeError),
        (b"{'a': 1}", r"cannot decode OrderPlaced: invalid JSON: ", json.JSONDecodeError),
        (b"\xff\xfe\x00", r"OrderPlaced: the payload is not UTF-8", UnicodeDecodeError),
        (order_body() + b" x", r"invalid JSON: Extra data: line 1 column", json.JSONDecodeError),
        (b" \n", r"cannot decode OrderPlaced: invalid JSON: Expecting value", json.JSONDecodeError),
    ],
    ids=[
        "missing",
        "str-for-int",
        "bool-for-int",
        "float-for-int",
        "null-for-str",
        "bad-decimal",
        "float-for-decimal",
        "bad-datetime",
        "bad-uuid",
        "object-for-list",
        "array-for-dataclass",
        "str-for-set",
        "int-for-optional-str",
        "top-level-shape",
        "empty",
        "not-json",
        "not-utf8",
        "trailing-data",
        "whitespace-only",
    ],
)
def test_decode_errors_name_the_message_the_path_and_the_expectation(
    body: bytes, message: str, cause: type[BaseException] | None
) -> None:
    with pytest.raises(SerializationError, match=message) as caught:
        codec.decode(body, OrderPlaced, name="OrderPlaced")
    if cause is None:
        assert caught.value.__cause__ is None
    else:
        assert isinstance(caught.value.__cause__, cause)


@pytest.mark.parametrize(
    ("into", "body", "message"),
    [
        (Color, b'"blue"', r'expected Color \(one of "red", "green"\), got string "blue"$'),
        (Level, b"3", r"expected Level \(one of 1, 2\), got integer 3$"),
        (Level, b"true", r"expected Level \(one of 1, 2\), got boolean true$"),
        (Level, b"1.0", r"expected Level \(one of 1, 2\), got number 1\.0$"),
        (Color, b"[]", r"expected Color .*, got an array$"),
        (Perm, b"8", r"expected Perm \(one of 1, 2\), got integer 8$"),
        (Literal["a", "b"], b'"c"', r'expected one of "a", "b", got string "c"$'),
        (Literal[1], b"true", r"expected one of 1, got boolean true$"),
        (Literal[1], b"{}", r"expected one of 1, got an object$"),
        (None, b"0", r"expected null, got integer 0$"),
        (bool, b"1", r"expected bool, got integer 1$"),
        (float, b'"1.5"', r'expected float, got string "1\.5"$'),
        (str, b"1", r"expected str, got integer 1$"),
        (date, b'"2024-01-01T10:00"', r"expected date \(an ISO 8601 string\)"),
        (time, b'"25:00"', r"expected time \(an ISO 8601 string\)"),
        (bytes, b'"not base64!"', r"expected bytes \(a base64 string\)"),
        (bytes, b"[1]", r"expected bytes \(a base64 string\), got an array$"),
        (Email, b"1", r"expected str, got integer 1$"),
        (
            tuple[int, str],
            b"[1]",
            r"expected tuple\[int, str\] \(an array of 2\), got an array of 1$",
        ),
        (tuple[int, str], b"{}", r"expected tuple\[int, str\] .*, got an object$"),
        (tuple[int, str], b"[1, 2]", r"Value\[1\]: expected str, got integer 2$"),
        (dict[str, int], b"[]", r"expected dict\[str, int\] \(an object\), got an array$"),
        (dict[str, int], b'{"a": 1, "b": "x"}', r"Value\['b'\]: expected int, got string"),
        (
            dict[int, str],
            b'{"01": "x"}',
            r"expected int key \(a decimal string\), got string \"01\"",
        ),
        (dict[int, str], b'{"one": "x"}', r"Value\['one'\]: expected int key"),
        (dict[UUID, int], b'{"x": 1}', r"Value\['x'\]: expected UUID \(a string\)"),
        (dict[Color, int], b'{"blue": 1}', r"expected Color key \(one of 'red', 'green'\)"),
        (list[int], b"[1, 2, null]", r"cannot decode Value\[2\]: expected int, got null$"),
        (set[Mutable], b'[{"n": 1}]', r"cannot build a set\[Mutable\]: unhashable type"),
        (
            int | str,
            b"[]",
            r"cannot decode Value: expected int \| str, got an array$",
        ),
        (
            Payment,
            b'{"method":{"kind":"cash","amount":"x"}}',
            r"cannot decode Value\.method: expected Card \| Cash, got an object \("
            r'as Card: \.kind: expected one of "card", got string "cash"; '
            r"as Cash: \.amount: expected Decimal",
        ),
        (
            Positive,
            b'{"amount": -1}',
            r"cannot decode Value: Positive\(\) rejected it: "
            r"ValueError\('amount must be positive'\)$",
        ),
        (
            Page[int],
            b'{"items": ["a"], "total": 1}',
            r'cannot decode Value\.items\[0\]: expected int, got string "a"$',
        ),
        (
            Bounded[int],
            b'{"value": "a"}',
            r'cannot decode Value\.value: expected int, got string "a"$',
        ),
        (
            Tree,
            b'{"value": 1, "children": [{"value": 2, "children": [{"value": "x"}]}]}',
            r"cannot decode Value\.children\[0\]\.children\[0\]\.value: expected int",
        ),
    ],
    ids=repr,
)
def test_decode_errors_for_each_type(into: Any, body: bytes, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        codec.decode(body, into, name="Value")


def test_a_long_value_is_shortened_in_the_message() -> None:
    with pytest.raises(SerializationError, match=r'got string "x{39}\.\.\.$'):
        codec.decode(json.dumps("x" * 100).encode(), int, name="N")


def test_the_cause_of_a_post_init_failure_is_kept() -> None:
    with pytest.raises(SerializationError) as caught:
        codec.decode(b'{"amount": 0}', Positive, name="Pay")
    assert isinstance(caught.value.__cause__, ValueError)


def test_deeply_nested_json_is_rejected() -> None:
    with pytest.raises(SerializationError, match=r"cannot decode Deep: nested too deeply"):
        codec.decode(b"[" * 200_000 + b"]" * 200_000, list[Any], name="Deep")


@pytest.mark.parametrize(
    ("into", "message"),
    [
        (
            Customer,
            r"cannot decode Value: Customer is not a dataclass, a pydantic model, a msgspec "
            r"Struct or another supported type; make it a dataclass, or pass a codec",
        ),
        (
            Order,
            r"cannot decode Value\.customer: Customer is not a dataclass",
        ),
        (list[Order], r"cannot decode Value\.customer: Customer is not a dataclass"),
        ("Line", r"cannot decode Value: 'Line' is not a dataclass"),
        (typing.Callable[[], int], r"Value: Callable\[.*\] is not a dataclass"),
        (
            dict[float, int],
            r"cannot decode Value: cannot decode dict keys into float: keys must be str, int, "
            r"UUID, an Enum or a Literal of strings",
        ),
    ],
    ids=repr,
)
def test_types_that_cannot_be_decoded_are_named(into: Any, message: str) -> None:
    for _ in range(2):  # a failed plan is not cached half-built
        with pytest.raises(SerializationError, match=message):
            codec.decode(b"{}", into, name="Value")


def test_unresolvable_annotations_are_reported() -> None:
    @dataclass
    class Local:
        other: Undefined  # noqa: F821

    with pytest.raises(
        SerializationError,
        match=r"cannot decode Local: cannot resolve the type hints of .*Local: "
        r"NameError\(.*Undefined.*define the types it refers to at module level",
    ) as caught:
        codec.decode(b"{}", Local, name="Local")
    assert isinstance(caught.value.__cause__, NameError)


# --- encode errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            Customer("ann"),
            r"cannot encode Customer: Customer is not a dataclass, a pydantic model or a "
            r"msgspec Struct; make it a dataclass, or pass a codec that can encode it$",
        ),
        (Order(Customer("ann")), r"cannot encode Order\.customer: Customer is not a dataclass"),
        (
            Page([1, Customer("ann")], 2),
            r"cannot encode Page\.items\[1\]: Customer is not a dataclass",
        ),
        ({"a": {"b": Customer("x")}}, r"cannot encode dict\['a'\]\['b'\]: Customer is not"),
        (
            {(1, 2): "x"},
            r"cannot encode dict: cannot encode the dict key \(1, 2\) \(tuple\): keys must be "
            r"str, int, UUID, or an Enum with str or int values$",
        ),
        ({True: "x"}, r"cannot encode the dict key True \(bool\)"),
        (Point(1.0, float("nan")), r"cannot encode Point\.y: JSON has no NaN or Infinity"),
        (
            {"a": [1.0, {"b": 2.0}], "c d": [1.0, float("inf")]},
            r"cannot encode dict\['c d'\]\[1\]: JSON has no NaN",
        ),
        (object(), r"cannot encode object: object is not a dataclass"),
    ],
    ids=repr,
)
def test_encode_errors_name_the_path_and_the_type(value: Any, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        codec.encode(value)


class Ratio(float):
    pass


class BrokenMapping(Mapping[str, int]):  # its own code raises a ValueError
    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> typing.Iterator[str]:
        raise ValueError("the mapping is closed")

    def __len__(self) -> int:
        return 0

    def items(self) -> typing.ItemsView[str, int]:
        raise ValueError("the mapping is closed")


HUGE = 10**5000  # more digits than Python's default int_max_str_digits (4300)
TOO_LONG = (
    r"the int has about 5001 digits, more than Python writes as text "
    r"\(sys\.get_int_max_str_digits\(\) is 4300\); make the field a Decimal or a str, or "
    r"raise the limit with sys\.set_int_max_str_digits\(\)"
)
SURROGATE = r"the str holds a lone surrogate \('\\ud800' at index 1\), which UTF-8 cannot encode"


# A dataclass of plain str/int/bool/float values (One, Point) encodes on the fast path,
# one with a list field (Page, Defaults) on the general one: the errors must be the same.
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (One(HUGE), r"cannot encode One\.only: " + TOO_LONG),
        (Page([1, HUGE], 2), r"cannot encode Page\.items\[1\]: " + TOO_LONG),
        ({HUGE: "x"}, r"cannot encode dict: the dict key: " + TOO_LONG),
        (Defaults("a\ud800"), r"cannot encode Defaults\.name: " + SURROGATE),
        (Page(["ok", "a\ud800"], 2), r"cannot encode Page\.items\[1\]: " + SURROGATE),
        ({"a\ud800": 1}, r"cannot encode dict: the dict key 'a\\ud800': " + SURROGATE),
        (Card("card", "4\ud800"), r"cannot encode Card\.number: " + SURROGATE),
        (
            BrokenMapping(),
            r"cannot encode BrokenMapping: reading it raised ValueError: the mapping is closed$",
        ),
    ],
    ids=[
        "int-fast",
        "int-general",
        "int-key",
        "str-fast",
        "str-general",
        "str-key",
        "str-2",
        "other",
    ],
)
def test_encode_errors_say_what_json_cannot_write(value: Any, message: str) -> None:
    with pytest.raises(SerializationError, match=message) as caught:
        codec.encode(value)
    assert "NaN" not in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            Point(1.0, float("-inf")),
            r"cannot encode Point\.y: JSON has no NaN or Infinity \(got -inf\)",
        ),
        (
            Page([1.0, float("nan")], 2),
            r"cannot encode Page\.items\[1\]: JSON has no NaN or Infinity \(got nan\)",
        ),
        ([Ratio("nan")], r"cannot encode list\[0\]: JSON has no NaN or Infinity \(got nan\)"),
    ],
    ids=["fast", "general", "float-subclass"],
)
def test_nan_and_infinity_cannot_be_encoded(value: Any, message: str) -> None:
    with pytest.raises(SerializationError, match=message + r"; send a finite number, or None"):
        codec.encode(value)


def test_a_cyclic_value_is_named_as_such() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    loop = Defaults("loop")
    loop.labels.append(loop)  # type: ignore[arg-type]
    for value, where in ((cyclic, r"list\[0\]"), (loop, r"Defaults\.labels\[0\]")):
        with pytest.raises(
            SerializationError,
            match=rf"cannot encode {where}: a circular reference .*; JSON cannot express one: "
            r"break the cycle",
        ) as caught:
            codec.encode(value)
        assert isinstance(caught.value.__cause__, RecursionError)


def test_a_value_nested_too_deeply_is_not_called_cyclic() -> None:
    deep: list[Any] = []
    inner = deep
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(
        SerializationError, match=r"cannot encode list: nested too deeply"
    ) as caught:
        codec.encode(deep)
    assert "circular" not in str(caught.value)
    assert "cyclic" not in str(caught.value)
    assert "flatten it" in str(caught.value)


@dataclass
class Link:
    value: int
    next: Link | None


def test_a_long_linked_value_is_said_too_deep_without_memory_in_the_square_of_its_length() -> None:
    import tracemalloc

    # Looking for a cycle after the RecursionError kept the whole path at every level:
    # 20,000 links took a GB (and 60,000 would take ten).
    head = None
    for n in range(20_000):
        head = Link(n, head)
    tracemalloc.start()
    try:
        with pytest.raises(SerializationError, match=r"cannot encode Link: nested too deeply"):
            codec.encode(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


class Endless(Mapping[str, Any]):
    """A tree made as it is read (a view of something bigger, say): every level is new."""

    deepest = 0

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        Endless.deepest = max(Endless.deepest, depth)

    def __getitem__(self, key: str) -> Any:
        return Endless(self.depth + 1) if self.depth < 200_000 else 0

    def __iter__(self) -> Any:
        return iter(["child"])

    def __len__(self) -> int:
        return 1


def test_a_value_made_as_it_is_read_is_said_too_deep_without_reading_it_all() -> None:
    # (Endless without an end, the search for a cycle went on until memory ran out.)
    Endless.deepest = 0
    with pytest.raises(SerializationError, match=r"cannot encode Endless: nested too deeply"):
        codec.encode(Endless())
    assert Endless.deepest <= 10 * sys.getrecursionlimit() + 1


class Recursing(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        return self[key]  # a bug of its own: recurses for ever

    def __iter__(self) -> Any:
        return iter(["a"])

    def __len__(self) -> int:
        return 1


def test_a_recursion_error_of_the_value_s_own_code_is_a_serialization_error() -> None:
    # The search for a cycle ran the value's code again, and its RecursionError escaped.
    with pytest.raises(SerializationError, match=r"cannot encode Recursing: nested too deeply"):
        codec.encode(Recursing())


def test_a_nan_deeper_than_python_s_stack_is_a_serialization_error() -> None:
    # msgspec builds the tree in C (3.12+: its C stack goes deeper than Python's): json
    # met the NaN, and the search for its path ran out of Python's stack, escaping bare.
    msgspec = pytest.importorskip("msgspec")

    class Holder(msgspec.Struct):
        data: Any

    deep: Any = [float("nan")]
    for _ in range(sys.getrecursionlimit() + 100):
        deep = [deep]
    # (3.11: msgspec itself finds it too deep.)
    with pytest.raises(SerializationError, match=r"cannot encode .*Holder: (.*nan|nested too)"):
        codec.encode(Holder(data=deep))


def test_a_cyclic_pydantic_model_says_to_break_the_cycle() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Folder(pydantic.BaseModel):
        children: list[Any]

    folder = Folder(children=[])
    folder.children.append(folder)
    with pytest.raises(
        SerializationError,
        match=r"cannot encode .*Folder: pydantic cannot encode it: Circular reference detected "
        r".*; break the cycle",
    ):
        codec.encode(folder)


# Python's json reads NaN, Infinity and -Infinity; they are not JSON, and encode refuses
# to write them. Point decodes on the fast path, Page (a list field) on the general one.
@pytest.mark.parametrize(
    ("body", "into", "message"),
    [
        (b'{"x":1.5,"y":NaN}', Point, r"cannot decode Msg\.y: the payload holds NaN, "),
        (b'{"items":[1.0,Infinity],"total":2}', Page[float], r"Msg\.items\[1\]: .* Infinity, "),
        (b'{"items":[{"x":1,"y":-Infinity}],"total":1}', Page[Point], r"Msg\.items\[0\]\.y: "),
        (b' {"x": NaN, "y": 1} ', Point, r"cannot decode Msg\.x: the payload holds NaN, "),
        (b"-Infinity", float, r"cannot decode Msg: the payload holds -Infinity, "),
        (b'{"x":NaN,"y":', Point, r"cannot decode Msg: the payload holds NaN, "),  # then cut
        (b'{"payload":NaN,"meta":{},"rows":[]}', Loose, r"cannot decode Msg\.payload: "),
    ],
    ids=["fast", "general", "nested", "whitespace", "root", "cut", "any"],
)
def test_nan_and_infinity_are_not_decoded(body: bytes, into: Any, message: str) -> None:
    with pytest.raises(
        SerializationError,
        match=message + r".*which is not JSON \(JSON has no NaN or Infinity\); the sender must "
        r"write a finite number, or null$",
    ):
        codec.decode(body, into, name="Msg")


LONG = "7" * 5000  # a JSON number with more digits than int() reads (4300 by default)


@dataclass(frozen=True)
class Amounts:
    total: Decimal
    parts: dict[str, list[int]]


# Python's json reads such a number with int(), which refuses it; the error said "invalid
# JSON" with no path (other decode errors name one).
@pytest.mark.parametrize(
    ("body", "into", "where"),
    [
        (f'{{"only":{LONG}}}', One, r"Msg\.only"),
        (f'{{"items":[1,-{LONG}],"total":2}}', Page[int], r"Msg\.items\[1\]"),
        (f'{{"total":{LONG},"parts":{{}}}}', Amounts, r"Msg\.total"),
        (f'{{"total":"1","parts":{{"a b":[0,{LONG}]}}}}', Amounts, r"Msg\.parts\['a b'\]\[1\]"),
        (
            f'{{"payload":1,"meta":{{"x":{{"y":{LONG}}}}},"rows":[]}}',
            Loose,
            r"Msg\.meta\['x'\]\['y'\]",
        ),
        (LONG, int, r"Msg"),
    ],
    ids=["fast", "general", "decimal", "dict", "any", "root"],
)
def test_an_integer_too_long_to_read_names_its_path(body: str, into: Any, where: str) -> None:
    with pytest.raises(
        SerializationError,
        match=rf"cannot decode {where}: the payload holds an integer of 5000 digits, more than "
        r"Python reads as an int \(sys\.get_int_max_str_digits\(\) is 4300\); the sender must "
        r"send it as a string \(a str or Decimal field\), or raise the limit with "
        r"sys\.set_int_max_str_digits\(\) in the receiver$",
    ) as caught:
        codec.decode(body.encode(), into, name="Msg")
    assert isinstance(caught.value.__cause__, ValueError)


def test_an_int_dict_key_too_long_to_read_says_so() -> None:
    # It said "expected int key (a decimal string)", of a decimal string.
    with pytest.raises(
        SerializationError,
        match=r"cannot decode Msg\['7{40}'\.\.\.\]: the key is an integer of 5000 digits, more "
        r"than Python reads as an int \(sys\.get_int_max_str_digits\(\) is 4300\); make the key "
        r"a str, or raise the limit",
    ) as caught:
        codec.decode(f'{{"{LONG}":1}}'.encode(), dict[int, int], name="Msg")
    assert isinstance(caught.value.__cause__, ValueError)


@dataclass(slots=True)
class Slotted:
    a: int
    b: int


@dataclass
class Plain:
    a: int
    tags: list[str]


@dataclass
class Stock:
    count: int


class Lazy(Stock):
    """A field replaced by a property whose own code fails."""

    @property  # type: ignore[override]
    def count(self) -> int:
        return 100 // self._stored

    @count.setter
    def count(self, value: int) -> None:
        self._stored = value


class Unset(Stock):
    @property  # type: ignore[override]
    def count(self) -> int:
        return self._missing  # type: ignore[attr-defined,no-any-return]

    @count.setter
    def count(self, value: int) -> None:
        pass


def _half_made(cls: type, **values: Any) -> Any:
    value = object.__new__(cls)
    for name, item in values.items():
        setattr(value, name, item)
    return value


NOT_SET = (
    # (3.13 names a slotted class with its module: 'tests.test_codecs.Slotted')
    r"the field is not set \('(?:[\w.]+\.)?{cls}' object has no attribute '{name}'\): the "
    r"object was made "
    r"without its __init__ \(object\.__new__, say\) or the attribute deleted; set every field "
    r"before sending it$"
)


# Reading a field escaped encode as the bare exception (an AttributeError, say).
@pytest.mark.parametrize(
    ("value", "message", "cause"),
    [
        (
            _half_made(Slotted, a=1),
            r"cannot encode Slotted\.b: " + NOT_SET.format(cls="Slotted", name="b"),
            AttributeError,
        ),
        (
            [Plain(1, []), _half_made(Plain, a=2)],
            r"cannot encode list\[1\]\.tags: " + NOT_SET.format(cls="Plain", name="tags"),
            AttributeError,
        ),
        (
            {"stock": [Lazy(0)]},
            r"cannot encode dict\['stock'\]\[0\]\.count: reading it raised ZeroDivisionError: "
            r"integer division or modulo by zero$",
            ZeroDivisionError,
        ),
        (
            Unset(1),
            r"cannot encode Unset\.count: reading it raised AttributeError: 'Unset' object has "
            r"no attribute '_missing'$",
            AttributeError,
        ),
    ],
    ids=["slots-fast", "general", "property", "property-attribute"],
)
def test_a_field_that_cannot_be_read_names_the_type_the_path_and_the_cause(
    value: Any, message: str, cause: type[Exception]
) -> None:
    with pytest.raises(SerializationError, match=message) as caught:
        codec.encode(value)
    assert type(caught.value.__cause__) is cause


# One scheme for paths in every error: an attribute is .name, a dict key ['key'], an item
# [0]. A dict's keys were written .key when json, not the codec, met the value.
@pytest.mark.parametrize(
    ("action", "message"),
    [
        (
            lambda: codec.encode({"a": {"b": float("nan")}}),
            r"cannot encode dict\['a'\]\['b'\]: JSON has no NaN",
        ),
        (
            lambda: codec.encode(Loose(1, {"a": "x\ud800"}, [])),
            r"cannot encode Loose\.meta\['a'\]: the str holds a lone surrogate",
        ),
        (
            lambda: codec.decode(
                b'{"payload":1,"meta":{"a":{"b":NaN}},"rows":[]}', Loose, name="M"
            ),
            r"cannot decode M\.meta\['a'\]\['b'\]: the payload holds NaN",
        ),
        (
            lambda: codec.decode(b'{"items":[{"x":1,"y":NaN}],"total":1}', Page[Point], name="M"),
            r"cannot decode M\.items\[0\]\.y: the payload holds NaN",
        ),
        (
            lambda: codec.decode(
                b'{"items":[],"total":1,"first":{"k":[NaN]}}',
                Page[dict[str, list[float]]],
                name="M",
            ),
            r"cannot decode M\.first\['k'\]\[0\]: the payload holds NaN",
        ),
    ],
    ids=["encode-nan", "encode-surrogate", "decode-nan", "decode-generic", "decode-union"],
)
def test_paths_write_attributes_dict_keys_and_items_one_way(
    action: Callable[[], Any], message: str
) -> None:
    with pytest.raises(SerializationError, match=message):
        action()


def test_a_cycle_through_a_dict_key_is_written_as_the_key_json_would_have() -> None:
    cyclic: dict[int, Any] = {}
    cyclic[7] = [cyclic]
    with pytest.raises(SerializationError, match=r"cannot encode dict\['7'\]\[0\]: a circular"):
        codec.encode(cyclic)


def test_a_long_dict_key_is_cut_in_the_path() -> None:
    # The whole key went into the message: a 5,000-character key, 5,000 characters of path.
    key = "k" * 5000
    with pytest.raises(SerializationError) as caught:
        codec.decode(f'{{"{key}":"x"}}'.encode(), dict[str, int], name="M")
    message = str(caught.value)
    assert message.startswith("cannot decode M['" + "k" * 40 + "'...]: expected int, got string")
    assert len(message) < 200
    with pytest.raises(SerializationError) as caught:
        codec.encode({key: Customer("x")})
    assert str(caught.value).startswith("cannot encode dict['" + "k" * 40 + "'...]: Customer")


def test_pydantic_errors_write_dict_keys_and_union_members_in_the_same_scheme() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Inner(pydantic.BaseModel):
        limits: dict[str, int]

    class Outer(pydantic.BaseModel):
        inner: Inner | None = None
        either: list[int] | int = 0

    with pytest.raises(SerializationError, match=r"cannot decode M\.inner\.limits\['a b'\]: "):
        codec.decode(b'{"inner":{"limits":{"a b":"x"}}}', Outer, name="M")
    # (pydantic puts the member it tried, 'list[int]', in the location: not a field)
    with pytest.raises(SerializationError, match=r"cannot decode M\.either\[1\]: Input should be"):
        codec.decode(b'{"either":[1,"x"]}', Outer, name="M")


@pytest.mark.parametrize("data", ['{"a":1}', memoryview(b'{"a":1}')], ids=["str", "memoryview"])
def test_a_payload_that_is_not_bytes_is_a_serialization_error(data: Any) -> None:
    # (it escaped as "AttributeError: 'str' object has no attribute 'decode'")
    with pytest.raises(
        SerializationError,
        match=rf"cannot decode M: expected the payload as bytes, got {type(data).__name__}; pass "
        r"bytes",
    ):
        codec.decode(data, dict[str, int], name="M")
    assert codec.decode(bytearray(b'{"a":1}'), dict[str, int], name="M") == {"a": 1}


def test_subclasses_of_builtins_encode_as_the_builtin() -> None:
    class Tags(list[str]):
        pass

    class Counts(dict[str, int]):
        pass

    assert codec.encode(Tags(["a"])) == b'["a"]'
    assert codec.encode(Counts(a=1)) == b'{"a":1}'
    assert codec.encode(Email("x")) == b'"x"'
    assert codec.encode(bytearray(b"hi")) == b'"aGk="'
    assert codec.encode(Perm.READ | Perm.WRITE) == b"3"


def test_unions_that_differ_only_in_order_keep_their_own_order() -> None:
    assert list[int | float] == list[float | int]  # equal to Python, not to the codec
    for _ in range(2):
        assert type(codec.decode(b"[1]", list[int | float], name="A")[0]) is int
        assert type(codec.decode(b"[1]", list[float | int], name="B")[0]) is float
        assert type(codec.decode(b"1", typing.Union[float, int], name="C")) is float  # noqa: UP007


def test_dict_keys_that_write_the_same_text_are_refused_not_lost() -> None:
    @dataclass
    class Stock:
        counts: dict[Any, str]

    with pytest.raises(SerializationError) as caught:
        JsonCodec().encode(Stock({1: "a", "1": "b"}))
    message = str(caught.value)
    assert "Stock.counts" in message
    assert "1 and '1' are both written as '1'" in message
    assert "one value would be lost" in message


def test_a_payload_that_is_not_utf8_says_so() -> None:
    @dataclass
    class Note:
        text: str

    with pytest.raises(SerializationError, match=r"cannot decode Note: the payload is not UTF-8"):
        JsonCodec().decode('{"text": "caf\u00e9"}'.encode("latin-1"), Note, name="Note")
