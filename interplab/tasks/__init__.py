"""interplab.tasks: algorithmic tasks with exact labels, loss positions and metrics.

>>> from interplab.tasks import get_task, list_tasks
>>> list_tasks()
['induction', 'ioi', 'modadd', 'parens', 'sorting']
>>> task = get_task("modadd", p=7)
>>> batch = task.generate(8, seed=0)
>>> model_cfg = task.model_config()

New tasks plug in by subclassing `Task` with a ``name`` class attribute.
"""

from interplab.tasks.base import Task, TaskBatch, get_task, list_tasks, task_from_dict
from interplab.tasks.induction import InductionTask
from interplab.tasks.ioi import IOITask
from interplab.tasks.modadd import ModAddTask
from interplab.tasks.parens import (
    ParensTask,
    count_equal,
    horizon_ok,
    is_balanced,
    load_paren_strings,
    paren_batch,
    paren_tokens,
    parens_from_file,
)
from interplab.tasks.sorting import SortingTask

__all__ = [
    "InductionTask",
    "IOITask",
    "ModAddTask",
    "ParensTask",
    "SortingTask",
    "Task",
    "TaskBatch",
    "count_equal",
    "get_task",
    "horizon_ok",
    "is_balanced",
    "list_tasks",
    "load_paren_strings",
    "paren_batch",
    "paren_tokens",
    "parens_from_file",
    "task_from_dict",
]
