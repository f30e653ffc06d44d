"""The ML library: data, models, PPO and its successors, training loops, evaluation; no knowledge of DVC or Prefect."""
