"""A write whose reply is lost: the Recommender reads its users back to decide whether the
batch landed, so that neither a retry nor the caller's resend stores an event twice."""

import pytest
import torch

from rec2pm.serving import Recommender
from rec2pm.serving.errors import StoreError

from .models import small_model


def recommender():
    torch.set_num_threads(1)
    return Recommender(small_model("rec2pm-o"), "memory://", device="cpu")


def lose_the_reply(rec, *, commit: bool, before_the_error=None):
    """The next put_many commits (or not) and then fails as a timed-out reply would."""
    put_many = rec.store.put_many

    def put_then_fail(writes):
        rec.store.put_many = put_many  # once
        if commit:
            put_many(writes)
        if before_the_error:
            before_the_error()
        raise StoreError("put_many failed (TimeoutError: Timeout reading from socket)")

    rec.store.put_many = put_then_fail


def test_a_batch_that_landed_before_its_reply_was_lost_is_acknowledged_once():
    rec = recommender()
    rec.observe(["a", "b"], [[1, 2], [3]])
    lose_the_reply(rec, commit=True)
    result = rec.observe(["a", "b"], [[4], [5, 6]])
    assert result.stored == [1, 2]
    assert rec.store.get("a").recent == (1, 2, 4) and rec.store.get("b").recent == (3, 5, 6)
    assert rec.store.get("a").version == 2


def test_a_batch_that_did_not_land_is_an_error_and_stores_nothing():
    rec = recommender()
    rec.observe(["a"], [[1, 2]])
    lose_the_reply(rec, commit=False)
    with pytest.raises(StoreError, match="Timeout"):
        rec.observe(["a"], [[4]])
    assert rec.store.get("a").recent == (1, 2) and rec.store.get("a").version == 1


def test_one_users_record_proves_the_batch_landed_when_another_was_written_over_since():
    rec, other = recommender(), recommender()
    other.store = rec.store  # a second writer on the same store
    rec.observe(["a", "b"], [[1], [2]])
    lose_the_reply(rec, commit=True, before_the_error=lambda: other.observe(["b"], [[7]]))
    rec.observe(["a", "b"], [[3], [4]])
    assert rec.store.get("a").recent == (1, 3) and rec.store.get("b").recent == (2, 4, 7)
    # With no user left to prove it, the outcome is unknown: the error stands.
    lose_the_reply(rec, commit=True, before_the_error=lambda: other.observe(["b"], [[8]]))
    with pytest.raises(StoreError):
        rec.observe(["b"], [[5]])
    assert rec.store.get("b").recent == (2, 4, 7, 5, 8)
