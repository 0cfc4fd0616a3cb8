"""trainfer: train, adapt, compress and serve Llama-family language models, measured at every step."""

from trainfer.errors import TrainferError
from trainfer.llm import LLM, Completion

__all__ = ["LLM", "Completion", "TrainferError"]
__version__ = "0.1.0"
