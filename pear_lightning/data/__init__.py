"""data: examples in, token batches out. Reading sources (``sources``), rendering chat or prompt/completion examples to
token ids and loss masks (``render``), checking them (``checks``), the behaviour log-prob cache on disk (``cache``,
``teacher``) and its token-exact join to the examples (``join``), collation into padded or packed batches
(``collate``), the resumable training loader (``loader``), mixtures of sources with their own behaviour policies
(``mixture``) and the LightningDataModule that ties them (``datamodule``).
It imports only the ground floor (``errors``, ``atomic``, ``sampling``): a tokenizer is all it needs of a model."""
