"""The layout's rules, read off the imports (docs/ARCHITECTURE.md): what may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports(folder: str) -> dict[str, set[str]]:
    """Module file -> every module name it imports (at any depth: function-level imports count)."""
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("streams", ("streamtrain.daemon", "streamtrain.tools", "streamtrain.config", "streamtrain.cli", "torch.distributed")),
        ("models", ("streamtrain.daemon", "streamtrain.tools", "streamtrain.config", "streamtrain.cli")),
        ("config", ("streamtrain.daemon", "streamtrain.tools", "streamtrain.cli")),
        # serving runs without the daemon: the repository layout, the served model and the HTTP side
        ("serve", ("streamtrain.daemon", "streamtrain.tools", "streamtrain.config", "streamtrain.cli")),
        ("tools", ("streamtrain.cli",)),
        ("daemon", ("streamtrain.cli", "streamtrain.tools")),
        ("demo", ("tests",)),
    ],
)
def test_a_layer_imports_nothing_above_it(folder, forbidden):
    def hits(names: set[str]) -> list[str]:
        return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in forbidden))

    bad = {f: hits(names) for f, names in imports(folder).items() if hits(names)}
    assert not bad, "see docs/ARCHITECTURE.md for what may import what"


def test_the_ingest_process_imports_no_torch():
    """The child starts in a fraction of a second because nothing it imports loads torch."""
    import subprocess
    import sys

    code = "import sys, streamtrain.streams.ingest_process; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_daemon_and_config_load_without_the_http_server():
    """The daemon publishes into the repository without the ``serve`` extra: FastAPI and uvicorn load for ``streamtrain serve`` only;
    mlflow loads only when publish.mlflow is set."""
    import subprocess
    import sys

    code = (
        "import sys, streamtrain.daemon.service, streamtrain.daemon.publisher, streamtrain.cli; "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'mlflow') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_core_install_loads_without_the_avro_and_protobuf_extras():
    """fastavro, protobuf and confluent-kafka's schema-registry module load only when data.format is avro or protobuf."""
    import subprocess
    import sys

    code = (
        "import sys, streamtrain.streams.ingest_process, streamtrain.streams.decode, streamtrain.daemon.service, streamtrain.cli; "
        "print(sorted(m for m in ('fastavro', 'google.protobuf', 'confluent_kafka.schema_registry', 'authlib') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
