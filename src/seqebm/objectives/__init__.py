"""Training objectives: small modules called as ``objective(model, batch, step=...)``.

Autoregressive models: :class:`TeacherForcingLoss`, :class:`ScheduledSamplingLoss`, :class:`EForcingLoss`.
Energy models ``model(x) -> E (N,)`` (monograph §2.3–2.4): :class:`ContrastiveDivergenceLoss`
(CD-k, PCD / stochastic maximum likelihood), :func:`stochastic_approximation`,
:class:`NCELoss`, :class:`DNCELoss`, :class:`DenoisingScoreMatchingLoss`.
"""

from seqebm.objectives.base import ObjectiveOutput, unwrap
from seqebm.objectives.contrastive_divergence import ContrastiveDivergenceLoss, ebm_data
from seqebm.objectives.eforcing import EForcingLoss, snis_step_weights, step_coefficients
from seqebm.objectives.nce import DNCELoss, NCELoss, nce_logits
from seqebm.objectives.noise import AutoregressiveNoise, GaussianNoise, NoiseDistribution, UniformSequenceNoise
from seqebm.objectives.scheduled_sampling import ScheduledSamplingLoss, teacher_forcing_ratio
from seqebm.objectives.score_matching import DenoisingScoreMatchingLoss, model_score
from seqebm.objectives.stochastic_approximation import SAResult, robbins_monro, stochastic_approximation
from seqebm.objectives.teacher_forcing import TeacherForcingLoss

__all__ = ["AutoregressiveNoise", "ContrastiveDivergenceLoss", "DNCELoss", "DenoisingScoreMatchingLoss", "EForcingLoss",
           "GaussianNoise", "NCELoss", "NoiseDistribution", "ObjectiveOutput", "SAResult", "ScheduledSamplingLoss",
           "TeacherForcingLoss", "UniformSequenceNoise", "ebm_data", "model_score", "nce_logits", "robbins_monro",
           "snis_step_weights", "step_coefficients", "stochastic_approximation", "teacher_forcing_ratio", "unwrap"]

# Distributional control (GDC-style, monograph §4.4.2 on ref. [72]).
from seqebm.objectives.distributional import DPGLoss, DistributionalTarget, fit_lambda  # noqa: E402

__all__ += ["DPGLoss", "DistributionalTarget", "fit_lambda"]
