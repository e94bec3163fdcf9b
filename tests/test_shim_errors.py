"""The shim's error table (shim/error_table.py): every kind of runtime/errors.py has its
status code, and the message carries the cleanup errors beside the failure.
tests/test_shim_states.py checks the same through the Task service's edge."""

import pytest

from api.ttrpc import Code
from runtime import errors
from shim.error_table import CODES, ttrpc_error


def _kinds(base=errors.ZvizError):
    yield base
    for sub in base.__subclasses__():
        yield from _kinds(sub)


def test_every_error_kind_has_a_row_in_the_shims_table():
    """Walks every kind, so a kind added to runtime/errors.py without a row fails here."""
    kinds = set(_kinds())
    assert kinds <= CODES.keys(), f"kinds without a status code: {kinds - CODES.keys()}"
    assert CODES.keys() <= kinds, f"rows for no kind: {CODES.keys() - kinds}"


@pytest.mark.parametrize("kind", sorted(set(_kinds()), key=lambda k: k.__name__))
def test_each_error_kind_answers_its_row_and_its_own_words(kind):
    answer = ttrpc_error(kind("the words of the failure"))
    assert (answer.code, answer.message) == (CODES[kind], "the words of the failure")


def test_the_codes_are_containerds_errdefs_reading_of_each_kind():
    assert ttrpc_error(errors.NotFound("x")).code == Code.NOT_FOUND
    assert ttrpc_error(errors.AlreadyExists("x")).code == Code.ALREADY_EXISTS
    assert ttrpc_error(errors.InvalidArgument("x")).code == Code.INVALID_ARGUMENT
    assert ttrpc_error(errors.FailedPrecondition("x")).code == Code.FAILED_PRECONDITION
    assert ttrpc_error(errors.SecurityLayerError("x")).code == Code.FAILED_PRECONDITION
    assert ttrpc_error(errors.NotImplementedByZviz("x")).code == Code.UNIMPLEMENTED
    assert ttrpc_error(errors.ZvizError("x")).code == Code.UNKNOWN


def test_a_cleanup_error_is_carried_beside_any_failure():
    failure = OSError(5, "I/O error")
    errors.carry_cleanup_error(failure, errors.Unavailable("unmount failed"))
    errors.carry_cleanup_error(failure, ValueError("second"))
    answer = ttrpc_error(failure)
    assert answer.code == Code.UNKNOWN
    assert answer.message == (
        "OSError: [Errno 5] I/O error; cleanup also failed: unmount failed"
        "; cleanup also failed: ValueError: second"
    )
