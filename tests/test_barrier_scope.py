"""The barrier's memory scope: GPU scope only when every rank of the group shares one GPU."""

from types import SimpleNamespace

import pytest

from symmtriton.context import barrier_scope
from symmtriton.env import BARRIER_SCOPE as SCOPE_ENV


def _hdl(backend, world, on_device):
    return SimpleNamespace(backend=backend, world_size=world, ranks_on_device=on_device)


@pytest.mark.parametrize("hdl, scope", [
    (_hdl("cuda", 4, 4), "gpu"),   # several ranks on one GPU
    (_hdl("cuda", 1, 1), "gpu"),
    (_hdl("cuda", 8, 1), "sys"),   # one rank per GPU: peers over NVLink
    (_hdl("cuda", 4, 2), "sys"),   # two GPUs, two ranks each
    (_hdl("host", 3, 1), "sys"),
])
def test_scope_follows_the_group_placement(monkeypatch, hdl, scope):
    monkeypatch.delenv(SCOPE_ENV, raising=False)
    assert barrier_scope(hdl) == scope


def test_environment_forces_system_scope(monkeypatch):
    monkeypatch.setenv(SCOPE_ENV, "sys")
    assert barrier_scope(_hdl("cuda", 4, 4)) == "sys"


def test_bad_environment_value_names_it(monkeypatch):
    monkeypatch.setenv(SCOPE_ENV, "cta")
    with pytest.raises(ValueError, match="'cta'"):
        barrier_scope(_hdl("cuda", 2, 2))
