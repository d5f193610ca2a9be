"""Errors cross process boundaries (Ray) with their fields intact."""

import pickle

from moefleet.cluster.errors import InvalidRequestError, OverloadedError, ShardUnavailableError


def test_errors_round_trip_through_pickle():
    for error in (InvalidRequestError("top_p", "must be in (0, 1]"), OverloadedError("queue full", 0.5),
                  ShardUnavailableError(3, "actor died")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
    assert pickle.loads(pickle.dumps(InvalidRequestError("prompt", "empty"))).field == "prompt"
