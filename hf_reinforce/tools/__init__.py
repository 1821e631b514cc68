"""Tools around the trainers; nothing in the core imports them.

* `memory` and `estimate` (`hf-reinforce estimate`): peak GPU memory by component, and what fits on a card;
* `gguf`, `from_gguf` (`hf-reinforce from-gguf`) and `make_smollm2` (`hf-reinforce make-smollm2`): real chat models
  from GGUF files, without the Hugging Face Hub (they need the `real` extra).
"""
