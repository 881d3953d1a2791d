"""Config-time validation of layouts and options: clear errors before any process group."""

import subprocess
import sys

import pytest

from megatron_most.options import ConfigError
from megatron_most.platform.layout import ParallelLayout
from megatron_most.platform.version import MegatronVersionError, check_megatron_core


def test_dp_size_for_fitting_layouts():
    assert ParallelLayout(tp=2, pp=2, ep=2, etp=1, sp=True).dp(4) == 1
    assert ParallelLayout(ep=2).dp(2) == 2
    assert ParallelLayout(pp=2).dp(4) == 2


@pytest.mark.parametrize(
    "layout, world, names",
    [
        (dict(tp=2, pp=2), 2, ["tp*pp=4", "world size 2"]),
        (dict(ep=4), 2, ["etp*ep*pp=4", "--ep"]),
        (dict(tp=3), 4, ["tp*pp=3"]),
    ],
)
def test_layout_that_does_not_fit_world_size(layout, world, names):
    with pytest.raises(ConfigError) as err:
        ParallelLayout(**layout).dp(world)
    for name in names:
        assert name in str(err.value)


def test_ep_must_divide_experts():
    with pytest.raises(ConfigError, match=r"ep=3 does not divide num_experts=64.*\[1, 2, 4, 8, 16, 32, 64\]"):
        ParallelLayout(ep=3).check_experts(64)
    ParallelLayout(ep=8).check_experts(64)


def test_sequence_parallel_needs_tp():
    with pytest.raises(ConfigError, match=r"sp=True with tp=1.*tp >= 2"):
        ParallelLayout(sp=True)


def test_moe_with_tp_needs_sp():
    with pytest.raises(ConfigError, match="add --sp"):
        ParallelLayout(tp=2).check_experts(4)
    ParallelLayout(tp=2, sp=True).check_experts(4)


def test_bad_values_and_unknown_fields():
    with pytest.raises(ConfigError, match=r"ParallelLayout.pp=0"):
        ParallelLayout(pp=0)
    with pytest.raises(ConfigError, match=r"unknown field 'ep_size'.*did you mean 'ep'"):
        ParallelLayout.from_dict({"tp": 1, "ep_size": 2})
    with pytest.raises(TypeError):
        ParallelLayout(2)  # keyword-only


def test_megatron_version_pin():
    assert check_megatron_core() == "0.16.1"
    with pytest.raises(
        MegatronVersionError, match=r"megatron-core==0.17.0 is installed.*pip install megatron-core==0.16.1"
    ):
        check_megatron_core("0.17.0")


BLOCK_GPU_EXTRAS = """
import importlib, pkgutil, sys
class Hide:  # GPU extras look uninstalled, even on a machine that has them
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('transformer_engine', 'apex'):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
import megatron_most
for m in pkgutil.walk_packages(megatron_most.__path__, 'megatron_most.'):
    importlib.import_module(m.name)
print('imported', len(list(pkgutil.walk_packages(megatron_most.__path__))))
"""


def test_package_imports_without_transformer_engine_or_apex():
    out = subprocess.run([sys.executable, "-c", BLOCK_GPU_EXTRAS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported" in out.stdout
