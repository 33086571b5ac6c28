"""RLHF with PPO and its critic-free relatives (REINFORCE, RLOO, GRPO)."""
