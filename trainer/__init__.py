"""reasonrl learner side: losses, data, learners (GRPO, SFT, DPO, expert iteration), CLI."""
