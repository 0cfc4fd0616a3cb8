"""Test-time compute: strategies that spend more inference on a question (`reason(llm, question, strategy)`),
the tasks they are measured on, and answer extraction. Drives infer/ through an LLM; nothing below imports it."""

from trainfer.reason.strategies import reason

__all__ = ["reason"]
