"""The embedded demo: a verifiable arithmetic task, its tokenizer, models and behaviour-policy data."""
