"""The seed's value function on a toy small enough to enumerate (`hf_reinforce.testing.EnumerableToy`).

The critic, trained only through `ReinforceTrainer` (default critic settings, the policy held fixed), must recover the
exact values of the recursion V(s_t) = Σ_a P(a|s_t)·V(s_{t+1}); as a baseline it must leave the policy gradient
unbiased while its variance is at or below the leave-one-out baseline's (RLOO).
"""

import pytest
import torch
from datasets import Dataset

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.advantages import critic_baseline, explained_variance, sequence_baseline, token_advantages
from hf_reinforce.testing import EnumerableToy, bias_statistic, per_sample_gradients


CRITIC_STEPS = 200
GROUP = 4


@pytest.fixture(scope="module")
def toy():
    return EnumerableToy()


@pytest.fixture(scope="module")
def trained_critic(toy, tmp_path_factory):
    """Train the critic with default settings while the policy stays put (learning rate 0); return the trainer."""
    args = ReinforceConfig(
        output_dir=str(tmp_path_factory.mktemp("toy")),
        num_generations=GROUP,
        per_device_train_batch_size=32,
        max_completion_length=toy.horizon,
        max_steps=CRITIC_STEPS,
        learning_rate=0.0,
        lr_scheduler_type="constant",
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
        reward_funcs=toy.reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [toy.prompt] * 64}),
        processing_class=toy.tokenizer,
    )
    trainer.train()
    for name, tensor in toy.policy.state_dict().items():
        assert torch.equal(tensor, policy_before[name]), f"{name} moved with a zero learning rate"
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
    learned = toy.critic_values(trained_critic.value_model)
    states = list(exact)
    exact_values = torch.tensor([exact[s] for s in states])[None]
    learned_values = torch.tensor([learned[s] for s in states])[None]
    ev = explained_variance(learned_values, exact_values, torch.ones_like(exact_values)).item()
    print(f"explained variance of the critic over all {len(states)} states: {ev:.3f}")
    assert ev >= 0.9
    assert trained_critic.critic.weight() > 0.5  # and the baseline trusts it


def test_critic_baseline_keeps_the_gradient_unbiased_with_variance_at_or_below_rloo(toy, trained_critic):
    completions = toy.sample(400 * GROUP, seed=1)  # 400 groups of 4 completions of the one prompt
    scores = toy.score_vectors(completions)
    learned = toy.critic_values(trained_critic.value_model)
    returns, mask, values = toy.token_tensors(completions, learned)
    _, _, exact = toy.token_tensors(completions, toy.exact_values())

    def gradients(baselines):
        return per_sample_gradients(scores, token_advantages(returns, baselines, mask))

    rewards = returns[:, 0]
    no_baseline = gradients(torch.zeros(len(completions)))
    rloo = gradients(sequence_baseline(rewards, "rloo", GROUP))
    with_critic = gradients(critic_baseline(values, returns, mask, GROUP, trained_critic.critic.weight()))
    exact_v = gradients(exact)
    # V(s_{t+1}) peeks at a_t: biased by construction, so the statistic can fail
    peeking = gradients(torch.cat([exact[:, 1:], returns[:, -1:]], dim=1) * mask)

    def variance(g):
        return g.var(0).sum().item()

    unbiased, biased = bias_statistic(with_critic, no_baseline, GROUP), bias_statistic(peeking, no_baseline, GROUP)
    relative = {name: variance(g) / variance(no_baseline) for name, g in (("rloo", rloo), ("critic", with_critic))}
    relative["exact V"] = variance(exact_v) / variance(no_baseline)
    print(
        f"bias statistic: critic {unbiased:.2f}, action-dependent {biased:.2f}; gradient variance relative to none: "
        + ", ".join(f"{name} {ratio:.3f}" for name, ratio in relative.items())
    )
    assert unbiased < 3.0  # the same mean gradient, within Monte-Carlo error
    assert biased > 10.0
    assert variance(with_critic) <= variance(rloo)
