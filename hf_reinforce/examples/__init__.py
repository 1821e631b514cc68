"""Examples built on the package, and the tiny models its tests use; nothing in the core imports them.

* `tiny`: tiny offline models, tokenizers and preference data (also importable as `hf_reinforce.testing`);
* `demo`: `hf-reinforce demo`, the whole method on a tiny character-level model on CPU;
* `real_demo`: `hf-reinforce real-demo`, the whole method on SmolLM2-135M-Instruct (needs the `real` extra).
"""
