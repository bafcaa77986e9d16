from dataclasses import dataclass

import pytest

from iambus import ImproperlyConfigured
from iambus.messages import contract
from iambus.routing import Routes, address


@dataclass
class Charge:
    pass


@contract("billing.Refunded")
@dataclass
class Refunded:
    pass


@dataclass
class Local:
    pass


def test_type_then_name_then_longest_module_prefix() -> None:
    module = __name__  # "tests.test_routing"
    routes = Routes(
        {
            Charge: "billing",
            "billing.Refunded": "payments",
            f"{module.split('.')[0]}.*": "everything",
            f"{module}.*": "this-module",
        }
    )
    assert routes.owner(Charge) == "billing"
    assert routes.owner(Refunded) == "payments"
    assert routes.owner(Local) == "this-module"  # the longest prefix
    assert routes.owner("on startup") is None
    assert routes.describe(Charge).endswith("Charge -> billing")


def test_a_module_pattern_does_not_match_a_longer_module_name() -> None:
    routes = Routes({"tests.test_rout.*": "x"})
    assert routes.owner(Local) is None


def test_string_names_route_string_messages() -> None:
    assert Routes({"on startup": "ops"}).owner("on startup") == "ops"


@pytest.mark.parametrize(
    ("routes", "match"),
    [
        ({Charge: ""}, r"routes\[<class .*Charge'>\] must be the name of the service .*got ''"),
        ({Charge: " "}, r"routes\[.*\] must be the name of the service"),
        ({Charge: 3}, r"routes\[.*\] must be the name of the service that owns it, got 3"),
        ({3: "billing"}, r"each key of routes must be a message class, .*'module\.\*'.*got 3"),
        ({"": "billing"}, "each key of routes must be a message class, a message name"),
    ],
)
def test_bad_routes_are_named(routes: dict[object, object], match: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=match):
        Routes(routes)  # type: ignore[arg-type]


def test_addresses() -> None:
    assert address("event", "OrderPlaced") == "event.OrderPlaced"
    assert not Routes()
    assert Routes({Charge: "billing"})
