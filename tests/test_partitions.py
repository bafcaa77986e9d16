"""iambus.partitions: the key → partition function every process must agree on."""

import zlib
from collections import Counter

import pytest

from iambus.errors import ImproperlyConfigured
from iambus.partitions import PARTITIONS, check_partitions, partition, partitions_option


def test_a_key_maps_to_the_same_partition_in_every_process_and_version() -> None:
    # Fixed values: a change here moves keys between partitions on a live cluster.
    assert [partition(key, 16) for key in ("order-42", "LH-400", "", "ü")] == [14, 12, 0, 5]
    assert partition("order-42", 16) == zlib.crc32(b"order-42") % 16
    assert partition("order-42", 1) == 0


def test_keys_spread_over_the_partitions() -> None:
    counts = Counter(partition(f"customer-{n}", PARTITIONS) for n in range(1600))
    assert set(counts) == set(range(PARTITIONS))
    assert max(counts.values()) < 2 * min(counts.values())


@pytest.mark.parametrize(
    ("given", "count"), [(16, 16), ("32", 32), (" 8 ", 8), (1, 1), (1024, 1024)]
)
def test_a_partition_count_from_code_or_a_url(given: object, count: int) -> None:
    assert check_partitions(given) == count


@pytest.mark.parametrize("given", [0, -1, 1025, "x", "16.0", 1.5, True, None, ""])
def test_a_bad_partition_count_says_what_is_allowed(given: object) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"partitions must be a whole number from 1"):
        check_partitions(given)


def test_a_transport_takes_its_count_from_the_keyword_then_the_url_then_the_default() -> None:
    query = {"partitions": "8", "namespace": "shop"}
    assert partitions_option(None, query) == 8
    assert query == {"namespace": "shop"}, "partitions must not reach the driver"
    assert partitions_option(4, {"partitions": "8"}) == 4
    assert partitions_option(None, {}) == PARTITIONS
    with pytest.raises(ImproperlyConfigured, match="partitions must be a whole number"):
        partitions_option(None, {"partitions": "many"})
