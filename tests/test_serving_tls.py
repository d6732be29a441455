"""TLS: TF Serving's --ssl_config_file on the gRPC and REST ports, and the client's TLS options."""

from __future__ import annotations

import http.client
import json
import ssl

import grpc
import pytest
import serving_helpers as helpers

from multimodal_tf import cli
from multimodal_tf.serving import Client, ModelServer, ModelSpec
from multimodal_tf.serving.config import ServingConfigError
from multimodal_tf.serving.tls import channel_credentials, load_ssl_config, ssl_config_text

# Short: a refused handshake fails at once; only a hang would use it up.
TIMEOUT_SECONDS = 10


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return helpers.make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def model_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("tls_models")
    helpers.make_test_savedmodel(base, "m", 1)
    return base / "m"


def write_ssl_config(path, certs, client_verify=False):
    text = ssl_config_text(
        certs["server_key"].read_text(),
        certs["server_cert"].read_text(),
        certs["ca"].read_text() if client_verify else "",
        client_verify,
    )
    path.write_text(text)
    return path


def serve(model_base, ssl_config_file):
    server = ModelServer(
        [ModelSpec("m", str(model_base))],
        port=0,
        rest_api_port=0,
        file_system_poll_wait_seconds=0,
        tls=load_ssl_config(ssl_config_file),
    )
    return server.start()


def grpc_predict(server, credentials=None):
    with Client(server.grpc_target, "m", timeout_seconds=TIMEOUT_SECONDS, credentials=credentials) as client:
        return client.predict(images=[helpers.png_bytes()], texts=["a red cat"], audios=[helpers.wav_bytes()])


def rest_status(server, context=None) -> int:
    """GET /v1/models/m over HTTPS with ``context`` (None: plain HTTP)."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_api_port, timeout=TIMEOUT_SECONDS)
    else:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.rest_api_port, timeout=TIMEOUT_SECONDS, context=context
        )
    try:
        connection.request("GET", "/v1/models/m")
        response = connection.getresponse()
        assert json.loads(response.read())["model_version_status"][0]["state"] == "AVAILABLE"
        return response.status
    finally:
        connection.close()


def client_context(certs, with_certificate=False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs["ca"]))
    if with_certificate:
        context.load_cert_chain(certs["client_cert"], certs["client_key"])
    return context


def test_tls_refuses_plain_text_and_serves_a_client_that_trusts_its_ca(certs, model_base, tmp_path):
    server = serve(model_base, write_ssl_config(tmp_path / "ssl.config", certs))
    try:
        assert server.rest_url.startswith("https://")
        with pytest.raises(grpc.RpcError) as plain:
            grpc_predict(server)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):  # a server certificate from another CA is not trusted
            grpc_predict(server, channel_credentials(certs["other_ca"]))
        outputs = grpc_predict(server, channel_credentials(certs["ca"]))
        assert outputs["probabilities"].shape == (1, 3)

        with pytest.raises((ConnectionError, http.client.HTTPException)):
            rest_status(server)  # plain HTTP to the HTTPS port
        assert rest_status(server, client_context(certs)) == 200
    finally:
        server.stop(0)


def test_mutual_tls_rejects_a_client_without_a_certificate(certs, model_base, tmp_path, capsys):
    server = serve(model_base, write_ssl_config(tmp_path / "ssl.config", certs, client_verify=True))
    try:
        with pytest.raises(grpc.RpcError) as anonymous:
            grpc_predict(server, channel_credentials(certs["ca"]))
        assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
        outputs = grpc_predict(
            server, channel_credentials(certs["ca"], certs["client_cert"], certs["client_key"])
        )
        assert outputs["probabilities"].shape == (1, 3)

        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            rest_status(server, client_context(certs))
        assert rest_status(server, client_context(certs, with_certificate=True)) == 200

        # mmtf predict with its TLS flags, against the same server.
        image = tmp_path / "image.png"
        image.write_bytes(helpers.png_bytes())
        command = ["predict", "--server", server.grpc_target, "--model-name", "m", "--image", str(image)]
        tls_flags = ["--ssl-root-certs", str(certs["ca"]), "--ssl-client-cert", str(certs["client_cert"])]
        tls_flags += ["--ssl-client-key", str(certs["client_key"])]
        capsys.readouterr()
        assert cli.main([*command, *tls_flags]) == 0
        assert json.loads(capsys.readouterr().out)["class_name"] in helpers.CLASS_NAMES
        assert cli.main([*command, "--ssl-root-certs", str(certs["ca"]), "--timeout-seconds", "5"]) == 1
        assert "UNAVAILABLE" in capsys.readouterr().err
    finally:
        server.stop(0)


def test_bad_tls_files_are_errors_that_name_the_file(certs, tmp_path, capsys):
    key, cert = certs["server_key"].read_text(), certs["server_cert"].read_text()
    cases = {
        "swapped.config": (ssl_config_text(cert, key), "server_key does not hold a PEM private key"),
        "mismatch.config": (
            ssl_config_text(certs["client_key"].read_text(), cert),
            "do not load as a key pair",
        ),
        "no_ca.config": (ssl_config_text(key, cert, client_verify=True), "client_verify needs custom_ca"),
        "typo.config": ('server_keys: "x"', "server_keys"),
        "bad_ca.config": (ssl_config_text(key, cert, custom_ca="not a certificate"), "custom_ca"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ServingConfigError, match=message) as error:
            load_ssl_config(path)
        assert str(path) in str(error.value)
    with pytest.raises(ServingConfigError, match="missing.config"):
        load_ssl_config(tmp_path / "missing.config")
    # The command line reports it in one line, before loading any model.
    capsys.readouterr()
    command = [
        "serve",
        "--model-base-path",
        str(tmp_path),
        "--ssl-config-file",
        str(tmp_path / "swapped.config"),
    ]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "swapped.config" in err and "Traceback" not in err

    with pytest.raises(ValueError, match="not_pem.txt.*certificate"):
        (tmp_path / "not_pem.txt").write_text("hello")
        channel_credentials(tmp_path / "not_pem.txt")
    with pytest.raises(ValueError, match="client_cert.pem does not hold a PEM private key"):
        channel_credentials(certs["ca"], certs["client_cert"], certs["client_cert"])
    with pytest.raises(ValueError, match="missing.pem"):
        channel_credentials(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="both"):
        channel_credentials(certs["ca"], certs["client_cert"])
