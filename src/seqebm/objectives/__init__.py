"""Training objectives: small modules called as ``objective(model, batch, step=...)``."""

from seqebm.objectives.base import ObjectiveOutput, unwrap
from seqebm.objectives.scheduled_sampling import ScheduledSamplingLoss, teacher_forcing_ratio
from seqebm.objectives.teacher_forcing import TeacherForcingLoss

__all__ = ["ObjectiveOutput", "ScheduledSamplingLoss", "TeacherForcingLoss", "teacher_forcing_ratio", "unwrap"]
