"""How well the real demo's critic predicts returns from prefixes of text, away from RL: on answers of the initial
policy, after k batches of the critic's own regression.

    python benchmarks/value_probe.py --reward_from outputs/real-arms/base/seed_0
    python benchmarks/value_probe.py --reward_from outputs/real-arms/base/seed_0 \\
        --reinforce_settings "critic_head_only=true critic_learning_rate=1e-2"

`--reward_from` is a seed folder of `real-demo` (its preference pairs and reward model; `benchmarks/real_arms.py`
makes them). The REINFORCE trainer is built as `real-demo --arm critic` builds it, with `--reinforce_settings` over
the recipe; nothing is sampled and the policy never moves. The distinct answers of the preference pairs (answers of
the initial policy) are scored by the trainer's rewards and turned into regression batches as value pretraining does
(`hf_reinforce.value_pretraining`: every prefix's target is its answer's return, the KL is 0). The critic then takes
`--batches` updates (`Critic.first_pass` and `Critic.update`, as in a run), one per batch of
`per_device_train_batch_size` answers, and after 0, 3, 6, 12 and 24 of them its values are scored on held-out answers:

- `explained_variance`: 1 − Var(G − V) / Var(G) over every held-out prefix;
- `explained_variance_batches`: as the trainer's pooled figure, Σ Var(G − V) / Σ Var(G) within batches of
  `per_device_train_batch_size` held-out answers;
- the same per third of the answer;
- at 0 batches also the copy's values calibrated per third (the least-squares line of G on V, fitted on the
  training answers): what the reward adapter's prefix scores know before any regression.

One JSON line per point is printed and appended to `--results`.
"""

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import set_seed

from hf_reinforce import value_pretraining
from hf_reinforce.advantages import position_thirds
from hf_reinforce.examples.real_demo.arguments import RealDemoArguments
from hf_reinforce.examples.real_demo.cli import prepare_model
from hf_reinforce.examples.real_demo.training import build_reinforce_trainer, value_pretraining_answers


CHECKPOINTS = (0, 3, 6, 12, 24)
POSITIONS = ("first", "middle", "last")


def regression_batches(trainer, data_dir: Path, num_held_out: int, num_batches: int, seed: int):
    """(held-out batches, training batches) of the preference pairs' distinct answers, in an order from `seed`."""
    answers = value_pretraining_answers(data_dir)
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    size = trainer.args.per_device_train_batch_size
    answers = answers.select(order[: num_held_out + num_batches * size])
    prompt_ids, completion_ids = value_pretraining.tokenized_answers(trainer, answers)
    rewards = value_pretraining.answer_rewards(trainer, answers, prompt_ids, completion_ids)

    def batches(start: int, stop: int) -> list:
        return [
            value_pretraining.regression_batch(
                trainer, list(range(i, min(i + size, stop))), rewards, prompt_ids, completion_ids
            )
            for i in range(start, stop, size)
        ]

    return batches(0, num_held_out), batches(num_held_out, len(answers))


def flattened(critic, batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Values, returns and thirds of every prefix of `batches` (float64, flat), and the prefixes per batch."""
    values, returns, thirds, sizes = [], [], [], []
    for input_ids, attention_mask, batch_returns, mask in batches:
        batch_values = critic.values(input_ids, attention_mask, batch_returns.size(1))
        kept = mask.bool()
        values.append(batch_values[kept])
        returns.append(batch_returns[kept])
        thirds.append(position_thirds(mask)[kept])
        sizes.append(int(kept.sum()))
    return torch.cat(values).double(), torch.cat(returns).double(), torch.cat(thirds), sizes


def explained_variance(values, returns) -> float:
    return (1 - (returns - values).var() / returns.var()).item()


def scores(values, returns, thirds, sizes) -> dict[str, float]:
    pairs = zip(torch.split(values, sizes), torch.split(returns, sizes))
    residual, total = zip(*(((g - v).var(), g.var()) for v, g in pairs if len(g) > 1))
    result = {
        "explained_variance": explained_variance(values, returns),
        "explained_variance_batches": (1 - sum(residual) / sum(total)).item(),
    }
    for index, position in enumerate(POSITIONS):
        where = thirds == index
        result[f"explained_variance_{position}"] = explained_variance(values[where], returns[where])
    return {name: round(value, 3) for name, value in result.items()}


def calibrated(values, thirds, training) -> torch.Tensor:
    """`values` mapped per third by the least-squares line of the returns on the values of the training prefixes."""
    train_values, train_returns, train_thirds, _ = training
    mapped = values.clone()
    for index in range(len(POSITIONS)):
        x = train_values[train_thirds == index]
        design = torch.stack([x, torch.ones_like(x)], dim=1)
        slope, intercept = torch.linalg.lstsq(design, train_returns[train_thirds == index].unsqueeze(1)).solution[:, 0]
        mapped[thirds == index] = slope * values[thirds == index] + intercept
    return mapped


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward_from", required=True, help="a real-demo seed folder (preferences and reward model)")
    parser.add_argument("--reinforce_settings", default="", help="ReinforceConfig fields, as real-demo takes them")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed and the order of the answers")
    parser.add_argument("--held_out", type=int, default=192, help="answers the values are scored on")
    parser.add_argument("--batches", type=int, default=max(CHECKPOINTS), help="regression batches (updates)")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--results", default="outputs/value_probe.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    demo_args = RealDemoArguments(
        output_dir="outputs/value_probe", seeds=[args.seed], arm="critic", reinforce_settings=args.reinforce_settings
    )
    set_seed(args.seed)
    data_dir = Path(args.reward_from)
    model = prepare_model(demo_args)
    trainer = build_reinforce_trainer(model, data_dir, Path(demo_args.output_dir), demo_args, args.seed)
    critic = trainer.critic
    critic.create_optimizer(args.batches)
    held_out, training = regression_batches(trainer, data_dir, args.held_out, args.batches, args.seed)
    label = {"reward_from": str(data_dir), "reinforce_settings": args.reinforce_settings, "seed": args.seed}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)

    def record(batches, values, returns, thirds, sizes) -> None:
        point = json.dumps({**label, "batches": batches, **scores(values, returns, thirds, sizes)})
        print(point, flush=True)
        with open(args.results, "a") as results:
            results.write(point + "\n")

    for done in range(args.batches + 1):
        if done in CHECKPOINTS:
            values, returns, thirds, sizes = flattened(critic, held_out)
            record(done, values, returns, thirds, sizes)
            if done == 0:
                mapped = calibrated(values, thirds, flattened(critic, training))
                record("0, calibrated", mapped, returns, thirds, sizes)
        if done < len(training):
            critic.update(critic.first_pass(*training[done]))


if __name__ == "__main__":
    main()
