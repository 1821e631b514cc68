"""Sampling the next token by inverse transform, and the LM head of a decoding step in blocks, for `generate` on CPUs.

`generate(do_sample=True)` draws each token with `torch.multinomial`, which on a CPU draws one exponential variable per
vocabulary entry: for 64 rows over SmolLM2's 49,152 tokens that is 78 ms a token on two cores, a sixth of the whole
generation. Inverse transform sampling needs one uniform variable per row and a cumulative sum: the same distribution,
other draws. [`InverseCdfSampler`] draws the token itself and leaves it the only finite score, so that
`generate(do_sample=False, logits_processor=[sampler])` keeps exactly its draw.
"""

import torch
from transformers import LogitsProcessor


# Vocabulary entries per product of `lm_head_in_blocks`: a (2048, hidden) block of the output embedding stays in cache
LM_HEAD_BLOCK = 2048
# Above this many rows a product over the whole vocabulary is as fast (prompts, training batches)
LM_HEAD_MAX_ROWS = 256


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` (B, V), drawn with probability proportional to its entry; returns (B,).

    Row b gets the first index whose cumulative probability exceeds u·total, u ~ U[0, 1): a zero-probability index is
    never drawn, since its cumulative probability equals its predecessor's.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    uniform = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator)  # (B, 1)
    # Strictly below the total, so that rounding of u·total can never land past the last drawable index
    threshold = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True).squeeze(-1)  # (B,)


class InverseCdfSampler(LogitsProcessor):
    """Samples each next token from softmax(scores / temperature) and masks every other token to -inf.

    Use with `do_sample=False` (greedy search then returns the sampled token) and no other sampling settings: it
    replaces temperature sampling with top_k=0, top_p=1.0.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        record_logps: bool = False,
        logps_temperature: float = 1.0,
        record_sum_squared_probs: bool = False,
    ):
        for name, value in (("temperature", temperature), ("logps_temperature", logps_temperature)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive.")
        self.temperature = temperature
        self.generator = generator
        # With record_logps, `token_logps` gets one (B,) tensor per step: log softmax(scores / logps_temperature) of
        # the drawn token, which otherwise takes another forward to compute. At 1 it is the model's own
        # log-probability; at the sampling temperature, the policy's as TRL's trainers score it.
        self.token_logps: list[torch.Tensor] | None = [] if record_logps else None
        self.logps_temperature = logps_temperature
        # With record_sum_squared_probs, `sum_squared_probs` gets one (B,) tensor per step: Σ_a π(a)² of the sampling
        # distribution, which the optimal token baseline needs and which otherwise takes another forward.
        self.sum_squared_probs: list[torch.Tensor] | None = [] if record_sum_squared_probs else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()  # (B, V)
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (B, V)
        tokens = inverse_cdf_sample(probs, self.generator)  # (B,)
        if self.token_logps is not None:
            scaled = logits / self.logps_temperature if self.logps_temperature != 1.0 else logits  # (B, V)
            drawn = scaled.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
            self.token_logps.append(drawn - scaled.logsumexp(dim=-1))
        if self.sum_squared_probs is not None:
            self.sum_squared_probs.append(probs.square().sum(dim=-1))
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter_(1, tokens.unsqueeze(1), 0.0)


def lm_head_in_blocks(model: torch.nn.Module) -> bool:
    """Compute `model`'s output embedding (LM head) in blocks of `LM_HEAD_BLOCK` vocabulary entries for a pass without
    gradients over at most `LM_HEAD_MAX_ROWS` rows on a CPU, as each step of generation is; returns whether installed.

    The same logits up to float rounding, about a third sooner for 32 to 128 rows over SmolLM2's 49,152 entries on two
    cores: the whole (49,152 × 576) operand does not stay in cache, a block does. Idempotent.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(head, torch.nn.Linear) or "forward" in head.__dict__:
        return False
    whole_product = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.size(-1)
        sharded = head.weight.shape != (head.out_features, head.in_features)  # e.g. by DeepSpeed ZeRO-3
        if torch.is_grad_enabled() or hidden.device.type != "cpu" or rows > LM_HEAD_MAX_ROWS or sharded:
            return whole_product(hidden)
        logits = hidden.new_empty(*hidden.shape[:-1], head.out_features)  # (..., V)
        for start in range(0, head.out_features, LM_HEAD_BLOCK):
            block = slice(start, start + LM_HEAD_BLOCK)
            bias = None if head.bias is None else head.bias[block]
            logits[..., block] = torch.nn.functional.linear(hidden, head.weight[block], bias)
        return logits

    head.forward = forward
    return True
