"""reasonrl rollout side: generation engines (vLLM, HF, the rollout-server client), the weight stream into
them, the rollout server's launcher and guard, and the reward module."""
