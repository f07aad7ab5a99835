"""Task metrics on the host: resolve the task once per run, then score each device's outputs.

Between devices and release: scoring reads arrays (device outputs, float reference, labels) and never runs a model.
"""
from pipeline.metrics.labels import check_class_labels, labels_from_coco
from pipeline.metrics.outputs import OutputsError, OutputSpec
from pipeline.metrics.score import (TASK_METRICS, attach, legacy, load_outputs, score_device, score_reference,
                                    score_result)
from pipeline.metrics.task import TASKS, TaskSpec, reductions, resolve_task, spec_dict

__all__ = ["TASKS", "TASK_METRICS", "OutputSpec", "OutputsError", "TaskSpec", "attach", "check_class_labels",
           "labels_from_coco", "legacy", "load_outputs", "reductions", "resolve_task", "score_device", "score_reference",
           "score_result", "spec_dict"]
