"""The RL engine: rollout → regulariser → advantages → losses, strung together by the trainer."""
