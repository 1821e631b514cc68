"""Sampling the next token by inverse transform, for `generate` on CPUs.

`generate(do_sample=True)` draws each token with `torch.multinomial`, which on a CPU draws one exponential variable per
vocabulary entry: for 64 rows over SmolLM2's 49,152 tokens that is 78 ms a token on two cores, a sixth of the whole
generation. Inverse transform sampling needs one uniform variable per row and a cumulative sum: the same distribution,
other draws. [`InverseCdfSampler`] draws the token itself and leaves it the only finite score, so that
`generate(do_sample=False, logits_processor=[sampler])` keeps exactly its draw.
"""

import torch
from transformers import LogitsProcessor


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

    def __init__(self, temperature: float = 1.0, generator: torch.Generator | None = None, record_logps: bool = False):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be positive.")
        self.temperature = temperature
        self.generator = generator
        # With record_logps, `token_logps` gets one (B,) tensor per step: log softmax(scores) of the drawn token, the
        # model's own log-probability of it (at temperature 1), which otherwise takes another forward to compute.
        self.token_logps: list[torch.Tensor] | None = [] if record_logps else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float()  # (B, V)
        probs = torch.softmax(logits / self.temperature, dim=-1)  # (B, V)
        tokens = inverse_cdf_sample(probs, self.generator)  # (B,)
        if self.token_logps is not None:
            drawn = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
            self.token_logps.append(drawn - logits.logsumexp(dim=-1))
        masked = torch.full_like(scores, float("-inf"))
        return masked.scatter_(1, tokens.unsqueeze(1), 0.0)
