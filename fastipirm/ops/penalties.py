"""Names of the IRM penalty variants every backend implements.

Let ``g`` be the gradient of an environment's (soft) contrastive loss, on logits divided by
``irm_temperature``, with respect to a dummy scale that multiplies the logits.

* ``"slot"`` (official IP-IRM, default): the dummy is a vector with one entry per logit column
  *slot* (positive first, then the negatives in the environment's own order); penalty
  ``sum_j g_j**2``.
* ``"scalar"`` (IRMv1, Arjovsky et al.): a scalar dummy; penalty ``(sum_j g_j)**2``.
  A deviation from the official code.
* ``"split"`` (the split-batch unbiased estimate, as DomainBed and the qwer1304 fork): the
  per-slot gradient is computed separately on the even and the odd rows (anchors) of the
  environment's logit matrix, each half with its own normalisation; penalty
  ``sum_j g_even_j * g_odd_j``. A deviation from the official code.
* ``"scalar_split"``: DomainBed's IRM exactly: scalar dummy, split-batch product.
"""
PENALTIES = ("slot", "scalar", "split", "scalar_split")
SCALAR_PENALTIES = ("scalar", "scalar_split")   # one dummy (one slot)
SPLIT_PENALTIES = ("split", "scalar_split")     # even/odd row groups
