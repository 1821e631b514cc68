"""Value pretraining (`hf_reinforce.value_pretraining`): the critic regressed on answers of the initial policy before
a fresh run starts, with the trainer's returns as targets."""

import time

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer
from hf_reinforce.advantages import explained_variance
from hf_reinforce.examples.real_demo import training
from hf_reinforce.examples.real_demo.arguments import RealDemoArguments
from hf_reinforce.examples.real_demo.data import write_jsonl
from hf_reinforce.testing import EnumerableToy, build_tiny_causal_lm, build_tiny_tokenizer
from hf_reinforce.value_pretraining import PRETRAINING_LOSS, pretrain_critic, tokenized_answers


def run_args(tmp_path, **overrides) -> ReinforceConfig:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 16,
        "num_generations": 4,
        "max_completion_length": 3,
        "max_steps": 1,
        "beta": 0.0,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    return ReinforceConfig(**{**settings, **overrides})


def toy_trainer(tmp_path, toy, answers=None, reward=None, **overrides) -> ReinforceTrainer:
    args = run_args(tmp_path, generation_kwargs={"suppress_tokens": toy.suppressed}, **overrides)
    return ReinforceTrainer(
        model=toy.policy,
        reward_funcs=reward or toy.reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [toy.prompt] * 64}),
        processing_class=toy.tokenizer,
        value_pretraining_dataset=answers,
    )


def sampled_answers(toy: EnumerableToy, num: int, seed: int) -> Dataset:
    """Completions of the toy's policy as a prompt-completion dataset of texts (EOS is not part of a text)."""
    texts = [toy.tokenizer.decode(list(c), skip_special_tokens=True) for c in toy.sample(num, seed=seed)]
    return Dataset.from_dict({"prompt": [toy.prompt] * num, "completion": texts})


def exact_value_explained_variance(toy: EnumerableToy, value_model) -> float:
    exact, learned = toy.exact_values(), toy.critic_values(value_model)
    exact_values = torch.tensor([[exact[state] for state in exact]])
    learned_values = torch.tensor([[learned[state] for state in exact]])
    return explained_variance(learned_values, exact_values, torch.ones_like(exact_values)).item()


def spied_first_passes(critic) -> list[dict]:
    calls, first_pass = [], critic.first_pass

    def spy(input_ids, attention_mask, returns, mask, layer_input=None):
        calls.append({"input_ids": input_ids, "returns": returns, "mask": mask, "layer_input": layer_input})
        return first_pass(input_ids, attention_mask, returns, mask, layer_input)

    critic.first_pass = spy
    return calls


def test_pretraining_makes_the_critic_explain_the_exact_values(tmp_path):
    """On the enumerable toy, 3 epochs over 256 answers of the policy (no RL step) take the critic's explained
    variance of the exact values from a fresh critic's 0 to well above one half."""
    toy = EnumerableToy()
    trainer = toy_trainer(tmp_path, toy, sampled_answers(toy, 256, seed=1), critic_pretraining_epochs=3)
    fresh = exact_value_explained_variance(toy, trainer.value_model)
    trainer.critic.create_optimizer(num_updates=48)
    observe_calls = []
    trainer.critic.observe = lambda *args: observe_calls.append(args)
    start = time.perf_counter()
    losses = pretrain_critic(trainer, trainer.value_pretraining_dataset)
    seconds = time.perf_counter() - start
    pretrained = exact_value_explained_variance(toy, trainer.value_model)
    print(f"explained variance: fresh {fresh:.3f}, pretrained {pretrained:.3f}; losses per epoch {losses}")
    print(f"pretraining: {seconds:.2f} s for 3 epochs over 256 answers, {100 * seconds / 256:.2f} s per 100 answers")
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert fresh < 0.1 and pretrained > 0.6
    assert observe_calls == []  # the fit of w waits for RL batches
    assert trainer.critic.scheduler.last_epoch == 3 * 16  # one update per 16 answers


def test_a_fresh_run_pretrains_first_logs_the_loss_and_its_schedule_counts_the_updates(tmp_path):
    toy = EnumerableToy()
    trainer = toy_trainer(tmp_path, toy, sampled_answers(toy, 40, seed=1), critic_pretraining_epochs=2, max_steps=2)
    calls = spied_first_passes(trainer.critic)
    pretrain, lrs = trainer.critic.pretrain, []

    def spy_pretrain(epochs):
        losses = pretrain(epochs)
        lrs.append(trainer.critic.scheduler.get_last_lr()[0])
        return losses

    trainer.critic.pretrain = spy_pretrain
    trainer.train()
    pretraining_updates = 2 * 3  # 2 epochs of ceil(40 / 16) batches
    assert len(calls) == pretraining_updates + 2  # then one per RL step
    assert [len(call["input_ids"]) for call in calls[:3]] == [16, 16, 8]
    # The schedule runs over pretraining and RL: after pretraining, 6 of its 8 updates are taken
    assert lrs == [pytest.approx(1e-3 * 2 / 8)]
    assert trainer.critic.scheduler.last_epoch == 8
    logged = [entry for entry in trainer.state.log_history if PRETRAINING_LOSS in entry]
    assert len(logged) == 1 and logged[0]["step"] == 0 and logged[0][PRETRAINING_LOSS] > 0


def test_the_targets_are_the_trainers_returns_with_the_missing_eos_penalty(tmp_path):
    """Each answer is cut at max_completion_length as a generation would be, scored as cut, and one cut without its
    EOS loses missing_eos_penalty; every prefix's target is that R (gamma 1, no KL at the start)."""
    toy, seen = EnumerableToy(), []

    def reward(completions, **kwargs):
        seen.extend(completions)
        return toy.reward(completions)

    answers = Dataset.from_dict({"prompt": [toy.prompt] * 3, "completion": ["a", "cc", "aaaaa"]})
    trainer = toy_trainer(tmp_path, toy, answers, reward=reward, missing_eos_penalty=0.75)
    calls = spied_first_passes(trainer.critic)
    trainer.train()
    assert seen[:3] == ["a", "cc", "aaa"]  # scored as the trainer would: the cut answer without its tail
    # The rows of the batch, in the shuffled order of the epoch: (completion ids, mask, returns) per answer
    completion_length = calls[0]["returns"].size(1)
    rows = zip(
        calls[0]["input_ids"][:, -completion_length:].tolist(), calls[0]["mask"].tolist(), calls[0]["returns"].tolist()
    )
    by_answer = {
        toy.tokenizer.decode(ids, skip_special_tokens=True): (ids, mask, returns) for ids, mask, returns in rows
    }
    a, c, eos, pad = (toy.tokenizer.convert_tokens_to_ids(t) for t in ("a", "c", "</s>", "<pad>"))
    assert by_answer["a"][:2] == ([a, eos, pad], [1, 1, 0]) and by_answer["a"][2][:2] == [1.0, 1.0]
    assert by_answer["cc"] == ([c, c, eos], [1, 1, 1], [-1.0, -1.0, -1.0])
    assert by_answer["aaa"] == ([a, a, a], [1, 1, 1], [3 - 0.75] * 3)  # cut without EOS: the penalty


def test_conversational_answers_are_tokenised_as_the_chat_template_renders_them(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "why?"}]]
    completions = [[{"role": "assistant", "content": "fine"}], [{"role": "assistant", "content": "because"}]]
    answers = Dataset.from_dict({"prompt": prompts, "completion": completions})
    seen = []

    def reward(completions, **kwargs):
        seen.extend(completions)
        return [float(len(c[0]["content"])) for c in completions]

    args = run_args(tmp_path, max_completion_length=16)
    trainer = ReinforceTrainer(
        model=build_tiny_causal_lm(tokenizer),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts * 8}),
        processing_class=tokenizer,
        value_pretraining_dataset=answers,
    )
    prompt_ids, completion_ids = tokenized_answers(trainer, answers)
    for prompt, completion, p_ids, c_ids in zip(prompts, completions, prompt_ids, completion_ids):
        rendered = tokenizer.apply_chat_template(prompt + completion, return_dict=False)
        assert p_ids + c_ids == rendered and c_ids[-1] == tokenizer.eos_token_id
        assert p_ids == tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    trainer.critic.create_optimizer(num_updates=1)
    pretrain_critic(trainer, answers)
    assert seen == completions


def test_a_critic_on_the_top_layers_of_the_policys_base_computes_its_own_lower_layers(tmp_path):
    """Pretraining has no reference pass to take the critic's layer input from: the critic's own forward of the
    frozen layers below it (its adapter active, the policy's not) gives what the reference pass would, and only the
    critic learns."""
    toy = EnumerableToy()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # a policy off its base
    args = run_args(tmp_path, generation_kwargs={"suppress_tokens": toy.suppressed}, beta=0.1, critic_layers=1)
    trainer = ReinforceTrainer(
        model=toy.policy,
        reward_funcs=toy.reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": [toy.prompt] * 64}),
        processing_class=toy.tokenizer,
        peft_config=lora,
        value_pretraining_dataset=sampled_answers(toy, 32, seed=1),
    )
    critic, policy = trainer.critic, trainer.model
    assert critic.model.first_trained_layer == 1
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters() if ".default." in n}
    critic_before = [p.detach().clone() for p in critic.model.trainable_parameters()]
    calls = spied_first_passes(critic)
    critic.create_optimizer(num_updates=2)
    pretrain_critic(trainer, trainer.value_pretraining_dataset)
    assert len(calls) == 2 and all(call["layer_input"] is None for call in calls)
    assert all(torch.equal(p, policy_before[n]) for n, p in policy.named_parameters() if ".default." in n)
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, critic.model.trainable_parameters()))
    input_ids = calls[0]["input_ids"]
    attention_mask = (input_ids != toy.tokenizer.pad_token_id).long()
    captured = []
    with torch.no_grad(), policy.disable_adapter(), critic.capturing_layer_input(captured):
        policy(input_ids=input_ids, attention_mask=attention_mask)  # the reference pass
    adapted = []
    with torch.no_grad(), critic.capturing_layer_input(adapted):
        policy(input_ids=input_ids, attention_mask=attention_mask)  # the policy's pass: another layer input
    assert not torch.allclose(adapted[0], captured[0])
    from_reference = critic.values(input_ids, attention_mask, 3, layer_input=captured[0])
    torch.testing.assert_close(critic.values(input_ids, attention_mask, 3), from_reference)


def test_resuming_from_a_checkpoint_does_not_pretrain_again(tmp_path):
    toy = EnumerableToy()
    answers = sampled_answers(toy, 32, seed=1)
    overrides = {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    first = toy_trainer(tmp_path, toy, answers, **overrides)
    first.train()
    assert sum(PRETRAINING_LOSS in entry for entry in first.state.log_history) == 1
    resumed = toy_trainer(tmp_path, EnumerableToy(), answers, **overrides)
    pretrained = []
    resumed.critic.pretrain = lambda epochs: pretrained.append(epochs) or [0.0]
    calls = spied_first_passes(resumed.critic)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert pretrained == [] and len(calls) == 1  # step 2 only
    # The critic's schedule came back from the checkpoint, pretraining updates included: 2 + 1, then step 2
    assert resumed.critic.scheduler.last_epoch == first.critic.scheduler.last_epoch == 4


def test_bad_inputs_are_named(tmp_path):
    toy = EnumerableToy()
    without_completion = Dataset.from_dict({"prompt": [toy.prompt], "answer": ["a"]})
    with pytest.raises(ValueError, match="value_pretraining_dataset has no `completion` column"):
        toy_trainer(tmp_path, toy, without_completion)
    answers = sampled_answers(toy, 4, seed=1)
    with pytest.raises(ValueError, match="value_pretraining_dataset pretrains the critic.*baseline='mean'"):
        toy_trainer(tmp_path, toy, answers, baseline="mean")
    with pytest.raises(ValueError, match="value_pretraining_dataset is empty"):
        toy_trainer(tmp_path, toy, answers.select([]))


def preference_rows() -> list[dict]:
    prompt = [{"role": "user", "content": "Review a tent."}]
    good, bad, other = (
        [{"role": "assistant", "content": text}] for text in ("A fine tent.", "It leaks.", "A tent, dry and warm.")
    )
    return [
        {"prompt": prompt, "chosen": good, "rejected": bad},
        {"prompt": prompt, "chosen": other, "rejected": bad},
        {"prompt": [{"role": "user", "content": "Review a lamp."}], "chosen": good, "rejected": bad},
    ]


@pytest.mark.parametrize(("arm_flags", "passed"), [({}, True), ({"baseline": "rloo"}, False), ({"arm": "otb"}, False)])
def test_the_real_demo_flag_hands_the_pairs_answers_to_a_trainer_with_a_critic(
    tmp_path, monkeypatch, arm_flags, passed
):
    write_jsonl(preference_rows(), tmp_path / "preferences" / "train.jsonl")
    write_jsonl([{"prompt": preference_rows()[0]["prompt"]}], tmp_path / "prompts" / "train.jsonl")
    answers = training.value_pretraining_answers(tmp_path)
    assert answers.column_names == ["prompt", "completion"] and len(answers) == 5  # (prompt, answer) once each
    assert answers[0] == {"prompt": preference_rows()[0]["prompt"], "completion": preference_rows()[0]["chosen"]}
    built = []
    monkeypatch.setattr(training, "ReinforceTrainer", lambda **kwargs: built.append(kwargs))
    monkeypatch.setattr(training, "with_metrics_on_progress_bar", lambda trainer, metrics: trainer)
    args = RealDemoArguments(output_dir=str(tmp_path / "out"), value_pretraining=True, **arm_flags)
    training.build_reinforce_trainer("model", tmp_path, tmp_path / "policy", args, seed=0)
    dataset = built[0]["value_pretraining_dataset"]
    assert (dataset is not None) is passed
    if passed:
        assert dataset.to_list() == answers.to_list()
