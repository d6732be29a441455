"""TLS for the server (TF Serving's ``--ssl_config_file``) and for the client.

The server reads TF Serving's ``SSLConfig`` text proto, whose fields hold
PEM *contents* (not file paths), as ``tensorflow_model_server`` does::

    server_key: "-----BEGIN PRIVATE KEY-----\\n...\\n-----END PRIVATE KEY-----"
    server_cert: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----"
    custom_ca: "-----BEGIN CERTIFICATE-----\\n..."   # optional: CA of client certificates
    client_verify: true                                # optional: mutual TLS

gRPC gets TF Serving's behaviour: ``client_verify`` requires every client
to present a certificate signed by ``custom_ca``. TF Serving serves REST in
plain text only; this server puts the same key, certificate and client check
on its REST port too, so one file secures both.

The client side (:func:`channel_credentials`) reads PEM *files*: the root
certificates that sign the server's certificate, and optionally the
client's own certificate and key for mutual TLS.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tempfile
from pathlib import Path

import grpc
from google.protobuf import text_format

from multimodal_tf.serving.config import ServingConfigError, SSLConfig

_CERTIFICATE = "-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = "PRIVATE KEY-----"  # PKCS#8 ("BEGIN PRIVATE KEY"), RSA and EC keys alike


@dataclasses.dataclass(frozen=True)
class TLSOptions:
    """A server's key, certificate and client check (the fields of TF Serving's ``SSLConfig``)."""

    server_key: str
    server_cert: str
    custom_ca: str = ""
    client_verify: bool = False
    source: str = "<ssl config>"  # where they came from, for error messages

    def __post_init__(self):
        if _PRIVATE_KEY not in self.server_key:
            raise ServingConfigError(f"{self.source}: server_key does not hold a PEM private key")
        if _CERTIFICATE not in self.server_cert:
            raise ServingConfigError(f"{self.source}: server_cert does not hold a PEM certificate")
        if self.custom_ca and _CERTIFICATE not in self.custom_ca:
            raise ServingConfigError(f"{self.source}: custom_ca does not hold a PEM certificate")
        if self.client_verify and not self.custom_ca:
            # TF Serving would fall back to the system roots; a private
            # deployment's client certificates are never signed by those.
            raise ServingConfigError(f"{self.source}: client_verify needs custom_ca (the clients' CA)")
        self.ssl_context()  # a key that does not match its certificate fails here, at start-up

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """The gRPC port's credentials, as ``tensorflow_model_server`` builds them."""
        return grpc.ssl_server_credentials(
            [(self.server_key.encode(), self.server_cert.encode())],
            root_certificates=self.custom_ca.encode() or None,
            require_client_auth=self.client_verify,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server-side context for the REST port (the same key, certificate and client check)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain reads files only: the PEM contents go through a
        # private temporary folder that is removed at once.
        with tempfile.TemporaryDirectory(prefix="mmtf-tls-") as folder:
            cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
            cert.write_text(self.server_cert, encoding="utf-8")
            key.touch(mode=0o600)
            key.write_text(self.server_key, encoding="utf-8")
            try:
                context.load_cert_chain(cert, key)
            except ssl.SSLError as e:
                raise ServingConfigError(
                    f"{self.source}: server_key and server_cert do not load as a key pair: {e}"
                ) from None
        if self.custom_ca:
            try:
                context.load_verify_locations(cadata=self.custom_ca)
            except ssl.SSLError as e:
                raise ServingConfigError(f"{self.source}: custom_ca does not load: {e}") from None
        context.verify_mode = ssl.CERT_REQUIRED if self.client_verify else ssl.CERT_NONE
        return context


def parse_ssl_config(text: str, where: str = "<ssl config>") -> TLSOptions:
    """Parses an ``SSLConfig`` text proto (PEM contents in its string fields)."""
    message = SSLConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ServingConfigError(f"{where}: {e}") from None
    return TLSOptions(
        message.server_key, message.server_cert, message.custom_ca, message.client_verify, source=where
    )


def load_ssl_config(path: str | os.PathLike) -> TLSOptions:
    """Reads TF Serving's ``--ssl_config_file``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ServingConfigError(f"cannot read SSL config file {path}: {e}") from None
    return parse_ssl_config(text, str(path))


def ssl_config_text(
    server_key: str, server_cert: str, custom_ca: str = "", client_verify: bool = False
) -> str:
    """An ``SSLConfig`` text proto holding these PEM contents (what ``--ssl-config-file`` reads)."""
    message = SSLConfig(
        server_key=server_key, server_cert=server_cert, custom_ca=custom_ca, client_verify=client_verify
    )
    return text_format.MessageToString(message)


def _read_pem(path: str | os.PathLike, what: str, marker: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e}") from None
    if marker.encode() not in data:
        kind = "private key" if marker == _PRIVATE_KEY else "certificate"
        raise ValueError(f"{what} file {path} does not hold a PEM {kind}")
    return data


def channel_credentials(
    root_certs: str | os.PathLike | None = None,
    client_cert: str | os.PathLike | None = None,
    client_key: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """gRPC TLS credentials from PEM files.

    Args:
        root_certs: certificates that sign the server's (None: the system's roots).
        client_cert: this client's certificate, for a server with ``client_verify``.
        client_key: the private key of ``client_cert``.

    Raises:
        ValueError: a file is missing or is not PEM of the expected kind
            (the message names the file), or only one of cert and key is given.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("give both a client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(root_certs, "SSL root certificates", _CERTIFICATE)
        if root_certs
        else None,
        private_key=_read_pem(client_key, "SSL client key", _PRIVATE_KEY) if client_key else None,
        certificate_chain=_read_pem(client_cert, "SSL client certificate", _CERTIFICATE)
        if client_cert
        else None,
    )
