"""model: the causal LM a run trains or scores with. Loading it in fp32 or 4-bit (``load``), LoRA through peft
(``lora``), FSDP2 units (``sharding``), attention over packed rows (``attention``), the memory-lean per-token
log-prob path (``logprobs``) and the top-k log-probs of distillation (``topk``), and checkpoint I/O
(``checkpoint_io``). It imports the ground floor and ``data`` (the collated batch's layout), never a stage above."""
