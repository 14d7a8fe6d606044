"""sidpt: a pure-PyTorch RL post-training system for LLM search agents."""

__version__ = "0.1.0"
