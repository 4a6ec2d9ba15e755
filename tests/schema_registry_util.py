"""A loopback stand-in for a Confluent schema registry: the few REST endpoints confluent-kafka's client calls.

No real registry installs here (Confluent's is Java, Karapace is not on PyPI), so the tests
run confluent-kafka's own serializers and client against this: ``POST /subjects/{s}/versions``
(register), ``POST /subjects/{s}`` (look a schema up), ``GET /schemas/ids/{id}``,
``GET /subjects/{s}/versions/latest``.  It stores the schema text as it was sent (the
Protobuf serializer sends a base64 FileDescriptorProto, which is also what
``?format=serialized`` asks for); a real registry converts between forms.  Every request
is counted by path, and anything else is answered 404 and logged in ``unknown``.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackRegistry:
    def __init__(self) -> None:
        self.schemas: dict[int, dict] = {}  # id -> {"schema": ..., "schemaType": ..., "references": [...]}
        self.subjects: dict[str, list[int]] = {}
        self.requests: Counter[str] = Counter()
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                registry._answer(self, "GET", None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                registry._answer(self, "POST", json.loads(body or b"{}"))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> LoopbackRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def register(self, subject: str, schema: str, schema_type: str = "AVRO") -> int:
        """Register a schema directly (as a producer elsewhere would have); its id."""
        with self.lock:
            same = [k for k, s in self.schemas.items() if s["schema"] == schema and s.get("schemaType", "AVRO") == schema_type]
            i = same[0] if same else len(self.schemas) + 1
            if not same:
                self.schemas[i] = {"schema": schema, "references": [], **({"schemaType": schema_type} if schema_type != "AVRO" else {})}
            versions = self.subjects.setdefault(subject, [])
            if i not in versions:
                versions.append(i)
            return i

    def _answer(self, handler: BaseHTTPRequestHandler, method: str, body: dict | None) -> None:
        path = handler.path.split("?", 1)[0]
        self.requests[f"{method} {path}"] += 1
        status, out = 404, {"error_code": 40403, "message": "Schema not found"}
        if method == "POST" and (m := re.fullmatch(r"/subjects/([^/]+)/versions", path)):
            i = self.register(m[1], body["schema"], body.get("schemaType", "AVRO"))
            status, out = 200, {"id": i}
        elif method == "POST" and (m := re.fullmatch(r"/subjects/([^/]+)", path)):
            for i in self.subjects.get(m[1], []):
                if self.schemas[i]["schema"] == body["schema"]:
                    status, out = 200, {"subject": m[1], "id": i, "version": self.subjects[m[1]].index(i) + 1, **self.schemas[i]}
        elif method == "GET" and (m := re.fullmatch(r"/schemas/ids/(\d+)", path)):
            if int(m[1]) in self.schemas:
                status, out = 200, self.schemas[int(m[1])]
        elif method == "GET" and (m := re.fullmatch(r"/subjects/([^/]+)/versions/latest", path)):
            if self.subjects.get(m[1]):
                i = self.subjects[m[1]][-1]
                status, out = 200, {"subject": m[1], "id": i, "version": len(self.subjects[m[1]]), **self.schemas[i]}
        elif not path.startswith("/associations/"):  # newer clients ask for a topic's associations: none here
            self.unknown.append(f"{method} {handler.path}")
        data = json.dumps(out).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def lookups(self, schema_id: int) -> int:
        """How many times schema ``schema_id`` was asked for."""
        return self.requests[f"GET /schemas/ids/{schema_id}"]
