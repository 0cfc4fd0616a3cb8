"""The bounds a server puts on its queue and on what a client sends, kept apart from the web stack: the CLI's
flags read their defaults here, so a command that serves nothing never imports FastAPI (~0.4 s of start-up)."""

MAX_QUEUE = 256
"""sequences waiting beyond max_num_seqs before a 429"""

MAX_BODY_BYTES = 4 << 20
"""the largest request body; a larger one gets 413"""
