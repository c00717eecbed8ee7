"""LofitError: the one base class of every error a user can fix (flags, files, data, checkpoints, adapters).

Each module names its own kind (cli.UsageError, data.DataError, hub.HubError, model.CheckpointError,
tokenizer.TokenizerError, adapter.AdapterError); every script's main() catches LofitError, prints
`error: <message>` and exits with status 2.
"""


class LofitError(Exception):
    """Bad input, with a message that says what is wrong and what to do."""
