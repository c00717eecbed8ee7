"""The lowest layer of the run machinery: atomic writes, the Hugging Face hub, the GGUF reader.

tokenizer.py and data/ use these; model.py, lofit.py and adapter.py do not.
"""
