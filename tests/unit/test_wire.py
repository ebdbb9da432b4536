from dataclasses import dataclass

from hypothesis import given, settings, strategies as st

from kvstore._proto.v1 import data_pb2
from kvstore.server.rpc.wire import encode_get_response


@dataclass
class Block:
    value: bytes
    checksum: int


blocks = st.lists(
    st.one_of(st.none(), st.builds(Block, st.binary(max_size=300), st.integers(0, 2**64 - 1))), max_size=20
)


@settings(max_examples=200, deadline=None)
@given(blocks)
def test_hand_encoded_get_response_parses_as_protobuf(found):
    parsed = data_pb2.GetResponse.FromString(encode_get_response(found))
    assert len(parsed.results) == len(found)
    for result, block in zip(parsed.results, found):
        if block is None:
            assert not result.found
        else:
            assert (result.found, result.value, result.length, result.checksum) == (
                True, block.value, len(block.value), block.checksum,
            )


def test_large_value_lengths():
    value = b"x" * 300_000
    parsed = data_pb2.GetResponse.FromString(encode_get_response([Block(value, 7)]))
    assert parsed.results[0].value == value and parsed.results[0].length == 300_000
