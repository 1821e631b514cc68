"""The seed's value function on a toy small enough to enumerate.

Vocabulary {a, b, c, EOS}, horizon 3, a fixed random policy and the reward R = #a − ½·#c. The exact value of every
state follows from the recursion V(s_t) = Σ_a P(a|s_t)·V(s_{t+1}) with V(terminal) = R; the critic, trained only
through `ReinforceTrainer`, must recover it, and as a baseline it must leave the policy gradient unbiased while
shrinking its variance.
"""

import pytest
import torch
from datasets import Dataset

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.advantages import explained_variance
from hf_reinforce.losses import reinforce_loss
from hf_reinforce.testing import build_tiny_causal_lm, build_tiny_tokenizer


HORIZON = 3
PROMPT = "ab"
CRITIC_STEPS = 300


def toy_reward(completions, **kwargs):
    return [text.count("a") - 0.5 * text.count("c") for text in completions]


class Toy:
    def __init__(self):
        self.tokenizer = build_tiny_tokenizer(characters="abc")
        self.policy = build_tiny_causal_lm(self.tokenizer, seed=0)
        with torch.no_grad():
            self.policy.lm_head.weight.mul_(3)  # a policy far enough from uniform that states differ in value
        tok = self.tokenizer
        self.suppressed = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id]  # actions are a, b, c and EOS
        self.prompt_ids = tok(PROMPT)["input_ids"]

    def next_token_probs(self, completion: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            logits = self.policy(torch.tensor([self.prompt_ids + list(completion)])).logits[0, -1]
        logits[self.suppressed] = -torch.inf
        return logits.softmax(-1)

    def reward_of(self, completion) -> float:
        return toy_reward([self.tokenizer.decode(list(completion), skip_special_tokens=True)])[0]

    def exact_values(self) -> dict[tuple[int, ...], float]:
        """V(s) for every non-terminal state s (a completion prefix), by the seed's recursion."""
        values = {}

        def value(completion):
            total = 0.0
            for action, prob in enumerate(self.next_token_probs(completion).tolist()):
                if prob == 0.0:
                    continue
                successor = completion + (action,)
                terminal = action == self.tokenizer.eos_token_id or len(successor) == HORIZON
                total += prob * (self.reward_of(successor) if terminal else value(successor))
            values[completion] = total
            return total

        value(())
        return values

    def critic_values(self, value_model, completions) -> torch.Tensor:
        """The critic's V for each state: its output at the state's last token."""
        with torch.no_grad():
            return torch.tensor(
                [value_model(torch.tensor([self.prompt_ids + list(c)]))[0, -1].item() for c in completions]
            )


@pytest.fixture(scope="module")
def toy():
    return Toy()


@pytest.fixture(scope="module")
def trained_critic(toy, tmp_path_factory):
    """Train only the critic (the policy waits through `critic_warmup_steps`) and return the trainer."""
    args = ReinforceConfig(
        output_dir=str(tmp_path_factory.mktemp("toy")),
        baseline="critic",
        num_generations=1,
        per_device_train_batch_size=32,
        max_completion_length=HORIZON,
        max_steps=CRITIC_STEPS,
        critic_warmup_steps=CRITIC_STEPS,
        critic_learning_rate=2e-3,
        beta=0.0,
        generation_kwargs={"suppress_tokens": toy.suppressed},
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
    )
    policy_before = {k: v.clone() for k, v in toy.policy.state_dict().items()}
    trainer = ReinforceTrainer(
        model=toy.policy,
        reward_funcs=toy_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [PROMPT] * 64}),
        processing_class=toy.tokenizer,
    )
    trainer.train()
    for name, tensor in toy.policy.state_dict().items():
        assert torch.equal(tensor, policy_before[name]), f"{name} moved during critic-only training"
    return trainer


def test_exact_values_satisfy_the_recursion(toy):
    values = toy.exact_values()
    assert len(values) == 1 + 3 + 9  # root, then a/b/c prefixes of length 1 and 2 (EOS ends an episode)
    # one step of the recursion, written out at the root
    probs = toy.next_token_probs(())
    eos = toy.tokenizer.eos_token_id
    a, b, c = (toy.tokenizer.convert_tokens_to_ids(x) for x in "abc")
    by_hand = probs[eos] * 0.0 + sum(probs[t] * values[(t,)] for t in (a, b, c))
    assert values[()] == pytest.approx(by_hand.item(), abs=1e-6)
    assert values[(a, a)] > values[(a,)] > values[()]  # more a's already written -> more reward to come


def test_critic_recovers_the_exact_value_function(toy, trained_critic):
    exact = toy.exact_values()
    states = list(exact)
    exact_values = torch.tensor([exact[s] for s in states])
    predicted = toy.critic_values(trained_critic.value_model, states)
    ev = explained_variance(predicted[None], exact_values[None], torch.ones(1, len(states))).item()
    print(f"explained variance of the critic over all {len(states)} states: {ev:.3f}")
    assert ev >= 0.9


def per_sample_gradients(toy, baseline_fn, num_samples=400, seed=0):
    """Per-completion gradients of the seed's loss w.r.t. the policy's output layer, for a given baseline."""
    torch.manual_seed(seed)
    tok = toy.tokenizer
    prompt = torch.tensor([toy.prompt_ids] * num_samples)
    sequences = toy.policy.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        top_k=0,
        max_new_tokens=HORIZON,
        suppress_tokens=toy.suppressed,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    weight = toy.policy.lm_head.weight
    gradients = []
    for sequence in sequences:
        completion = sequence[len(toy.prompt_ids) :].tolist()
        if tok.eos_token_id in completion:
            completion = completion[: completion.index(tok.eos_token_id) + 1]
        ids = torch.tensor([toy.prompt_ids + completion])
        logits = toy.policy(ids).logits[0, len(toy.prompt_ids) - 1 : -1]  # (T, vocab): π(·|s_t)
        logits = logits.masked_fill(torch.isin(torch.arange(len(tok)), torch.tensor(toy.suppressed)), -torch.inf)
        logprobs = logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).T  # (1, T)
        advantages = toy.reward_of(completion) - baseline_fn(completion)  # (1, T)
        loss = reinforce_loss(logprobs, advantages, torch.ones_like(logprobs))
        gradients.append(torch.autograd.grad(loss, weight)[0].flatten())
    return torch.stack(gradients)  # (num_samples, vocab * hidden)


def test_critic_baseline_keeps_the_gradient_unbiased_and_lowers_its_variance(toy, trained_critic):
    def critic_baseline(completion):  # V(s_t) for t = 0..T−1: the prefixes before each action
        return toy.critic_values(trained_critic.value_model, [tuple(completion[:t]) for t in range(len(completion))])

    def action_dependent_baseline(completion):  # V(s_{t+1}) peeks at a_t: biased by construction
        return toy.critic_values(
            trained_critic.value_model, [tuple(completion[: t + 1]) for t in range(len(completion))]
        )

    no_baseline = per_sample_gradients(toy, lambda completion: torch.zeros(len(completion)))
    with_critic = per_sample_gradients(toy, critic_baseline)
    peeking = per_sample_gradients(toy, action_dependent_baseline)
    num_samples = len(no_baseline)

    def bias_statistic(difference):
        # ‖mean‖² over its expected size under "no bias", tr Cov / n; about 1 when the means agree
        return (difference.mean(0).square().sum() / (difference.var(0).sum() / num_samples)).item()

    unbiased = bias_statistic(no_baseline - with_critic)
    biased = bias_statistic(no_baseline - peeking)
    variance_ratio = (with_critic.var(0).sum() / no_baseline.var(0).sum()).item()
    print(f"bias statistic: critic {unbiased:.2f}, action-dependent {biased:.2f}; variance ratio {variance_ratio:.3f}")
    assert unbiased < 3.0  # the same mean gradient, within Monte-Carlo error
    assert biased > 10.0  # the statistic does catch a biased baseline
    assert variance_ratio < 0.8
