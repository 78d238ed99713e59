"""Estimators of normalising constants and expectations of energy-based models.

* :mod:`seqebm.estimators.exact`: brute-force enumeration (ground truth for tiny V, T).
* :mod:`seqebm.estimators.importance`: IS / SNIS in log space, effective sample size
  (monograph §2.3.2, Eq. 2.26–2.30).
* :mod:`seqebm.estimators.ais`: annealed importance sampling and its reverse, which bracket log Z.
* :mod:`seqebm.estimators.nowozin`: lower/upper/jackknife log Z estimates from n weights
  (residual-EBM seed Thm. 2, Eq. 4; Nowozin 2018).
"""

from seqebm.estimators.ais import ais_log_partition, reverse_ais_log_partition

from seqebm.estimators.exact import enumerate_sequences, exact_distribution, exact_log_partition
from seqebm.estimators.importance import (effective_sample_size, importance_log_partition, snis_expectation,
                                          snis_weights)
from seqebm.estimators.nowozin import LogPartitionBounds, leave_one_out_logsumexp, log_partition_bounds

__all__ = ["LogPartitionBounds", "ais_log_partition", "effective_sample_size", "enumerate_sequences", "exact_distribution", "exact_log_partition",
           "importance_log_partition", "leave_one_out_logsumexp", "log_partition_bounds",
           "reverse_ais_log_partition", "snis_expectation", "snis_weights"]
