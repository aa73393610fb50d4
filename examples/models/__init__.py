"""Small models the examples use: a Llama-style decoder (llama.py) and an addition task it is trained on (tiny_task.py)."""
