"""Start-up's objects are frozen out of full garbage collections once mitmproxy runs, unless turned off."""

import gc

import pytest
from mitmproxy.test import taddons

from llmha.addons.gcfreeze import GcFreeze


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.parametrize("on", [True, False])
def test_objects_alive_when_mitmproxy_runs_are_frozen_unless_turned_off(unfrozen, on):
    addon = GcFreeze()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, llm_ha_gc_freeze=on)
        addon.running()
        assert (gc.get_freeze_count() > 0) is on
