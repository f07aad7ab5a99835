"""`edgepipe optimize`: choose each device class's format by measuring it on the boards.

- `candidates`: what is measured and decided, as data (Candidate, DeviceClass, OptimizeResult; the JSON);
- `classes`: device classes from what each board really runs (the probe), fallbacks named;
- `choice`: choosing so that noise does not choose (significant and beyond --min-gain, else a tie);
- `command`: the command itself (measure, recover int8, re-time decisive leads interleaved, choose, advise).
"""
from pipeline.optimize.candidates import (CANDIDATES, DEFAULT_MAX_DROP, DEFAULT_MIN_GAIN, OBJECTIVES, Budget,
                                          Candidate, DeviceClass, OptimizeResult)
from pipeline.optimize.choice import Decision, Evidence, choose, decide
from pipeline.optimize.classes import budget_for, device_classes
from pipeline.optimize.command import advise, check_candidates, check_model, check_options, main_metric, optimize

__all__ = ["CANDIDATES", "DEFAULT_MAX_DROP", "DEFAULT_MIN_GAIN", "OBJECTIVES", "Budget", "Candidate", "Decision",
           "DeviceClass", "Evidence", "OptimizeResult", "advise", "budget_for", "check_candidates", "check_model",
           "check_options",
           "choose", "decide", "device_classes", "main_metric", "optimize"]
