"""Host probe: measured once per machine, cached as JSON, reused; a real short probe gives a valid Hardware."""
import json

import torch

from lmforge.hwmodels import host as host_mod
from lmforge.hwmodels.hardware import Hardware


def _counting_probe(monkeypatch, hw):
    calls = []

    def probe():
        calls.append(1)
        return hw

    monkeypatch.setattr(host_mod, "_probe", probe)
    return calls


def test_second_call_reuses_the_cache(tmp_cache, cpu_hw, monkeypatch):
    calls = _counting_probe(monkeypatch, cpu_hw)
    first = host_mod.host_hardware()
    second = host_mod.host_hardware()
    assert len(calls) == 1
    assert first == second == cpu_hw
    path = host_mod.cache_file()
    assert path.parent == tmp_cache / "hw"
    assert Hardware.from_dict(json.loads(path.read_text())) == cpu_hw


def test_refresh_measures_again(tmp_cache, cpu_hw, monkeypatch):
    calls = _counting_probe(monkeypatch, cpu_hw)
    host_mod.host_hardware()
    host_mod.host_hardware(refresh=True)
    assert len(calls) == 2


def test_corrupt_cache_file_is_replaced(tmp_cache, cpu_hw, monkeypatch):
    calls = _counting_probe(monkeypatch, cpu_hw)
    host_mod.cache_file().write_text("{not json")
    assert host_mod.host_hardware() == cpu_hw
    assert len(calls) == 1
    assert json.loads(host_mod.cache_file().read_text())["name"] == cpu_hw.name


def test_cache_key_depends_on_thread_count(monkeypatch):
    key = host_mod.machine_key()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    assert host_mod.machine_key() != key


def test_real_short_probe_is_a_valid_cpu(tmp_cache):
    hw = host_mod._probe(budget_s=0.6)
    assert hw.validate() is hw
    assert hw.kind == "cpu" and hw.name == "host"
    assert hw.sm_count == torch.get_num_threads()
    assert hw.peak("tfloat32") == hw.peak("float32")
    sys_caches = host_mod._cache_sizes()
    assert dict(hw.caches) == sys_caches
    assert 0 < hw.launch_overhead_s < 1e-3
    assert "not measured" in hw.notes
