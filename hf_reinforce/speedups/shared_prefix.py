"""One forward for the tokens that every row of a batch starts with.

Preference pairs built from chat prompts start alike: the chat template's system turn and the instruction before the
item are the same in every chosen and rejected sequence (21 of SmolLM2's 31 prompt tokens in `hf-reinforce
real-demo`). [`forward_with_shared_prefix`] runs those leading tokens once, for one row, keeps their keys and values in
a cache repeated to every row, and runs each row's own tokens on it: the same logits and gradients to float rounding,
for the prefix's share of the batch's tokens less compute.
"""

import torch
from transformers import DynamicCache


def shared_prefix_length(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None = None
) -> int:
    """Leading positions at which every row of `input_ids` (B, L) holds the same token and no padding, leaving each
    row at least one token of its own; with `pad_token_id`, one that is not that id (a sequence classifier scores
    the last such token, and a chat model's end of turn may be its pad token)."""
    same = (input_ids == input_ids[:1]).all(dim=0) & attention_mask.bool().all(dim=0)  # (L,)
    common = int(same.int().cumprod(dim=0).sum())
    own = attention_mask.bool() if pad_token_id is None else attention_mask.bool() & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (L,)
    last_own = torch.where(own, positions, -1).max(dim=1).values  # (B,): the last token each row must keep
    return max(0, min(common, int(last_own.min())))


def forward_with_shared_prefix(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int | None = None,
    **kwargs,
):
    """`model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)` for right-padded rows (B, L), with the
    rows' shared prefix computed once. A decoder (causal LM or sequence classifier) that takes a cache is needed: its
    outputs then cover the positions after the prefix, (B, L − prefix, ...), which is all a sequence classifier's
    pooled score (the last token that is not `pad_token_id`) and the log-probabilities of answers after a shared
    prompt read."""
    prefix = shared_prefix_length(input_ids, attention_mask, pad_token_id) if input_ids.size(0) > 1 else 0
    if prefix == 0:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    cache = DynamicCache()
    cached = {"cache": cache, "use_cache": True}
    model(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix], **cached)
    cache.batch_repeat_interleave(input_ids.size(0))  # (1, heads, prefix, dim) -> (B, ...); gradients sum back
    kwargs.pop("use_cache", None)
    return model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, **cached, **kwargs)
