"""Hardware models: target descriptions, roofline time and Kinetics eFLOPs, host probe, calibration.

    from lmforge.hwmodels import get_target, node_time
    hw = get_target("h100")                 # a preset (datasheet numbers), or "host" (probed, cached)
    est = node_time(cost, hw)               # roofline time of one op's Cost, its bound and eFLOPs

Modules: `hardware` (the Hardware value), `presets` (datasheet presets and the target registry), `host`
(CPU probe), `roofline` (time and eFLOPs of a Cost), `kinetics` (best-of-N closed form),
`instances` (op instances to time), `calibrate` (fit efficiency factors from measurements).
"""
from lmforge.hwmodels.calibrate import Calibration, calibrate, calibrated, default_measure, load_calibration
from lmforge.hwmodels.hardware import PEAK_DTYPES, Hardware
from lmforge.hwmodels.host import host_hardware
from lmforge.hwmodels.kinetics import decode_step_cost, kinetics_best_of_n
from lmforge.hwmodels.presets import PRESETS, get_target, targets
from lmforge.hwmodels.roofline import Estimate, eflops, node_time, roofline_time

__all__ = ["Calibration", "Estimate", "Hardware", "PEAK_DTYPES", "PRESETS", "calibrate", "calibrated",
           "decode_step_cost", "default_measure", "eflops", "get_target", "host_hardware", "kinetics_best_of_n",
           "load_calibration", "node_time", "roofline_time", "targets"]
