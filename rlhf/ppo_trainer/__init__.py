"""PPO for RLHF on any number of processes under accelerate; the math is in :mod:`rlhf.ppo`, sampling in
:mod:`rlhf.sampling`. Start at :func:`rlhf.ppo_trainer.loop.train_ppo`: it calls the other modules, one per step.

    loop        train_ppo: one iteration = 1. prompts … 9. metrics, top to bottom
    models      PPOModels and load_ppo_models; the trained module (policy + critic, or policy + value head)
    experience  steps 1–6: prompts, generate, truncate, score (old log-probs, reference, values, RM), advantages
    optimise    step 7: prepare_training (wrap for the launch) and optimise (K epochs of minibatch updates)
    losses      the policy's and the value model's loss on one micro-batch
    memory      one-process paths: policy_then_critic_backward (memory), Bf16Weights (bf16 speed)
    processes   N processes: the accelerator, shards, gathers, token weights, FSDP's whole weights, export
    checks      the non-finite guards before and after each update
    resume      PPO's resume checkpoints on the shared manager (rlhf.checkpoint.ResumeCheckpoints)
    snapshots   the policy every ppo.snapshot_every iterations, for the evaluation's over-optimisation curve
"""
