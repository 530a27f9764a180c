"""behavior: π_β's side of PEAR. The samplers that draw responses with their log-probs (``samplers``, transformers or
vLLM), the ``generate`` command, scoring data with a behaviour or teacher model into the log-prob cache
(``score``, the ``cache_logprobs`` command), and the one resumable Parquet-shard writer both use (``shards``). It
imports ``model``, ``data`` and the ground floor, never ``training`` or ``cli``."""
