"""Every fine-tuning task by name: `finetune --task NAME` runs `TASKS[NAME]` through the one driver."""

from __future__ import annotations

from minivlm.tasks.caption import CaptionTask
from minivlm.tasks.nlvr2 import NLVR2Task
from minivlm.tasks.retrieval import RetrievalTask
from minivlm.tasks.task import Task
from minivlm.tasks.vqa import VQATask

TASKS: dict[str, type[Task]] = {t.name: t for t in (CaptionTask, VQATask, NLVR2Task, RetrievalTask)}
