"""Floor 5: training on Megatron-Core's parts: DDP + optimizer wiring and the step on its
schedules (`engine`), and the parallel self-check (`selfcheck`). Imports every floor below.
"""
