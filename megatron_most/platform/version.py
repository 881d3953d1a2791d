"""The one Megatron-Core release megatron_most is built and tested against.

Our subclasses and the CPU compatibility layer touch Megatron-Core internals (named in
`compat_cpu.py` and in the MoE/model subclasses); those move between releases, so any other
version is refused up front instead of failing deep inside a training step.
"""

from importlib import metadata

MEGATRON_CORE_VERSION = "0.16.1"


class MegatronVersionError(RuntimeError):
    pass


def check_megatron_core(installed: str | None = None) -> str:
    """Return the installed megatron-core version, or raise if it is not the pinned one."""
    if installed is None:
        try:
            installed = metadata.version("megatron-core")
        except metadata.PackageNotFoundError as err:
            raise MegatronVersionError(
                "megatron-core is not installed: run `pip install -e .` "
                f"(it pins megatron-core=={MEGATRON_CORE_VERSION})"
            ) from err
    if installed != MEGATRON_CORE_VERSION:
        raise MegatronVersionError(
            f"megatron-core=={installed} is installed but megatron_most requires "
            f"megatron-core=={MEGATRON_CORE_VERSION}: run "
            f"`pip install megatron-core=={MEGATRON_CORE_VERSION}`"
        )
    return installed
