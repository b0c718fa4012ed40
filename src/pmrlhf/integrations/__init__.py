"""Preference matching inside other RLHF frameworks, one optional module per framework.

* :mod:`pmrlhf.integrations.trl` — a reward-function plug-in for TRL's ``RLOOTrainer`` and
  ``GRPOTrainer`` (``PenaltyReward``).
* :mod:`pmrlhf.integrations.verl` — ``pm`` and ``cpm:<alpha>`` ``kl_penalty`` types for verl's
  in-reward penalty, installed into Ray workers by a ``worker_process_setup_hook``.
* :mod:`pmrlhf.integrations.openrlhf` — the same for OpenRLHF's k1 in-reward path.

Every module takes its per-token penalty from :mod:`pmrlhf.regularizers`, so a regulariser
registered there works in each framework too. Importing this package imports no framework.
"""
