"""Files, below the method: every output written atomically, a model name turned into a local
directory (the Hugging Face hub), and the GGUF reader (plain data: a config dict, tensors, a tokenizer).

tokenizer.py and data/ use these; model.py, lofit.py and adapter.py do not. The run machinery
(machinery/) sits above the method, this package below it.
"""
