"""Floor 2 (beside `moe`): the audio side of the data path: files -> 16 kHz waveforms (DALI) ->
frozen HuBERT features -> k-means units. Imports `platform` and `options` only."""

from megatron_most.audio.hubert import HubertEncoder
from megatron_most.audio.loading import AudioLoader, AudioOptions
from megatron_most.audio.units import UnitCodebook, dedup_units, fit_codebook

__all__ = ["AudioLoader", "AudioOptions", "HubertEncoder", "UnitCodebook", "dedup_units", "fit_codebook"]
