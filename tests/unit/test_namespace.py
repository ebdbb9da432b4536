import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.errors import InvalidArgumentError
from kvstore.namespace import MAX_KEY_BYTES, Namespace, range_end, validate_key

names = st.text(alphabet="abcXYZ019._:-", min_size=1, max_size=20)


def test_key_limits():
    assert validate_key(b"k") == b"k"
    assert validate_key(bytearray(b"kk")) == b"kk"
    assert validate_key(b"x" * MAX_KEY_BYTES) == b"x" * 1024
    with pytest.raises(InvalidArgumentError) as err:
        validate_key(b"", 3)
    assert err.value.code == "EMPTY_KEY" and err.value.index == 3
    with pytest.raises(InvalidArgumentError) as err:
        validate_key(b"x" * 1025, 0)
    assert err.value.code == "KEY_TOO_LARGE" and "1025" in str(err.value)
    with pytest.raises(InvalidArgumentError, match="str"):
        validate_key("text")
    with pytest.raises(InvalidArgumentError, match="int"):
        validate_key(12)


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 129, "sp ace", "ünï"])
def test_invalid_names(bad):
    with pytest.raises(InvalidArgumentError) as err:
        Namespace(bad, "s")
    assert err.value.code == "INVALID_NAMESPACE"
    with pytest.raises(InvalidArgumentError):
        Namespace("t", bad)


def test_defaults_and_roundtrip():
    ns = Namespace()
    assert (ns.tenant, ns.subtenant) == ("default", "default")
    key = ns.storage_key(b"\x00\xffkey")
    assert Namespace.from_prefix(key) == (ns, b"\x00\xffkey")


@settings(max_examples=200, deadline=None)
@given(names, names, names, names, st.binary(min_size=1, max_size=16), st.binary(min_size=1, max_size=16))
def test_namespaces_never_share_a_key_range(t1, s1, t2, s2, k1, k2):
    a, b = Namespace(t1, s1), Namespace(t2, s2)
    ka, kb = a.storage_key(k1), b.storage_key(k2)
    if a != b:
        assert not ka.startswith(b.prefix) and not kb.startswith(a.prefix)
        assert ka != kb
    # Every key of a namespace lies in [prefix, range_end(prefix)).
    assert a.prefix <= ka < range_end(a.prefix)


def test_range_end():
    assert range_end(b"ab") == b"ac"
    assert range_end(b"a\xff") == b"b"
    with pytest.raises(ValueError):
        range_end(b"\xff\xff")
