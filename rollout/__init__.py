"""reasonrl rollout side: prompts, tasks, rewards and generation engines (vLLM and HF)."""
