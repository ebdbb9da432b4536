"""Each bench peer that is installed here round-trips blocks byte-exact."""

import pytest

from bench.peers import ALL_PEERS, available_peers, run_peer


@pytest.mark.parametrize("name", ALL_PEERS)
def test_peer_round_trip(name):
    spec = available_peers([name], segment_bytes=256 << 20)[0]
    if spec.reason:
        pytest.skip(spec.reason)
    with spec.factory() as peer:
        put, get = run_peer(peer, 64 << 10, 16, batch=8)
    assert (put.case, get.case) == (f"{spec.name} put", f"{spec.name} get")
    assert put.blocks == get.blocks == 16 and put.calls == get.calls == 2
