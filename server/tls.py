"""TLS of a daemon's gRPC port, and of its own calls to the other daemons.

``--tls-cert``/``--tls-key`` turn TLS on; ``--tls-client-ca`` makes it mutual
(every client, and every peer daemon, must present a certificate that CA
signed). When this daemon dials a peer it verifies the peer's certificate
against ``--tls-ca`` (default: the client CA, else the system's roots) and
presents its own certificate, so one certificate per daemon, signed by the
cluster's CA, serves both directions.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from kvstore.server.config import ServerConfig


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    client_ca = _read(config.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def peer_credentials(config: ServerConfig) -> grpc.ChannelCredentials | None:
    if not config.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.tls_ca or config.tls_client_ca),
        private_key=_read(config.tls_key),
        certificate_chain=_read(config.tls_cert),
    )
