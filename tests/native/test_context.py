"""Context: transport selection (UCX_TLS variants) and UCX settings, each
checked with real transfers over a loopback endpoint and between two workers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvstore import _native, errors
from tests.native.support import LOOPBACK, pattern

pytestmark = pytest.mark.timeout(60)


async def roundtrip(context: _native.Context, target: _native.Worker, worker: _native.Worker) -> list:
    """Get and put 1 MiB; returns the endpoint's transports."""
    src = pattern(1 << 20)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    with context.register(src) as src_handle, context.register(dst) as dst_handle:
        endpoint = worker.connect(target.address)
        with endpoint.unpack_rkey(src_handle.packed_rkey) as rkey:
            await endpoint.get_async(dst_handle, [0], [src_handle.address], [src.nbytes], rkey)
            assert np.array_equal(dst, src)
            dst[:] = 0
        with endpoint.unpack_rkey(dst_handle.packed_rkey) as rkey:
            await endpoint.put_async(src_handle, [0], [dst_handle.address], [src.nbytes], rkey)
            assert np.array_equal(dst, src)
        transports = endpoint.transports
        endpoint.close()
        assert endpoint.transports == []
        return transports


# "tcp" alone also serves a worker connecting to itself (over 127.0.0.1): UCX's
# "self" transport cannot detect peer failure, so it is never used.
@pytest.mark.parametrize("tls", ["tcp", "shm,tcp", "all", None])
async def test_transport_lists(tls):
    context = _native.Context(tls, settings=LOOPBACK)
    assert context.tls == (tls or "")
    with _native.Worker(context) as worker, _native.Worker(context) as other:
        for target in (worker, other):  # loopback, then two workers
            transports = await roundtrip(context, target, worker)
            # Bytes move by CMA (zero-copy shared memory) whenever shared memory
            # is allowed; TCP carries UCX's own messages, on 127.0.0.1 only.
            assert (("cma", "memory") in transports) == (tls != "tcp")
            assert ("tcp", "lo") in transports
            assert {device for name, device in transports if name == "tcp"} == {"lo"}


@pytest.mark.parametrize("tls", ["shm", "self"])
def test_transports_without_failure_detection_cannot_connect(tls):
    # Endpoints handle peer failure; posix/sysv shared memory and "self"
    # cannot detect it, so UCX finds no usable transport for the endpoint.
    context = _native.Context(tls)
    with _native.Worker(context) as worker:
        with pytest.raises(_native.TransportError):
            worker.connect(worker.address)


def test_unknown_transport_is_refused():
    with pytest.raises(errors.InvalidArgumentError):
        _native.Context("no-such-transport")


@pytest.mark.parametrize("settings", [{"NO_SUCH_VARIABLE": "1"}, {"KEEPALIVE_INTERVAL": "soon"}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(errors.InvalidArgumentError, match="invalid UCX setting"):
        _native.Context("tcp", settings=settings)


def test_the_environment_is_left_alone():
    before = dict(os.environ)
    _native.Context("tcp", settings={"NET_DEVICES": "lo", "KEEPALIVE_INTERVAL": "5s"})
    assert dict(os.environ) == before


def test_repr():
    assert repr(_native.Context("tcp", settings=LOOPBACK)) == "Context(tls='tcp')"
