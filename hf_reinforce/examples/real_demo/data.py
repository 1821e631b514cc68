"""The real demo's prompts and items, how they are split, its recipes, and the JSON-lines files of its datasets."""

import json
import random
from pathlib import Path


# A short system message of our own: without one, SmolLM2's chat template writes its default ("You are a helpful AI
# assistant named SmolLM, trained by Hugging Face"), ten tokens longer, a seventh of every sequence this demo runs
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT = "Write a one-sentence review of {item}."
# Only to write some of the reward model's training answers (contrast prompts): the pairs keep PROMPT
NEGATIVE_PROMPT = "Write a one-sentence negative review of {item}."
POSITIVE_PROMPT = "Write a one-sentence enthusiastic review of {item}."
# Things to review: every kind of product, place, work and service, so that no one word pleases the judge everywhere.
ITEMS = (
    "a pizza restaurant, a sushi bar, a vegan cafe, a food truck, a bakery, a steakhouse, a noodle shop, an ice cream "
    "parlour, a wine bar, a breakfast diner, a hotel in Paris, a beach resort, a mountain cabin, a youth hostel, a "
    "campsite, a cruise ship, an airport lounge, a train station, a city bus, a taxi service, a bicycle, an electric "
    "scooter, a used car, a minivan, a smartphone, a laptop, a tablet, a smartwatch, a pair of headphones, a "
    "wireless mouse, a mechanical keyboard, a computer monitor, a printer, a digital camera, a video game console, a "
    "board game, a jigsaw puzzle, a novel, a cookbook, a poetry collection, a comic book, a history podcast, a "
    "science documentary, a romantic comedy, a horror film, a superhero movie, an animated film, a stage musical, a "
    "jazz album, a rock concert, a symphony orchestra, an art museum, a science museum, a zoo, an aquarium, a theme "
    "park, a public library, a botanical garden, a hiking trail, a city park, a swimming pool, a gym, a yoga class, a "
    "dance school, a language course, an online course, a driving school, a dentist, a hair salon, a barber shop, a "
    "spa, a laundromat, a dry cleaner, a plumber, an electrician, a moving company, a bank, an insurance company, a "
    "phone carrier, an internet provider, a streaming service, a weather app, a fitness app, a music app, a coffee "
    "mug, a teapot, a blender, a toaster, a microwave oven, a vacuum cleaner, a washing machine, a refrigerator, an "
    "office chair, a sofa, a mattress, a desk lamp, a backpack, a suitcase, a raincoat, a pair of running shoes, a "
    "winter jacket, a wool sweater, a wristwatch, a sunscreen, a shampoo, a perfume, a toothbrush, a garden hose, a "
    "lawn mower, a power drill, a tent, a sleeping bag, a fishing rod, a kayak, a tennis racket, a football club, a "
    "chess set, a houseplant, a pet shop, a dog groomer, a farmers market, a shopping mall, a bookshop, a florist"
).split(", ")
DATA_DIRS = ("preferences", "prompts")
REWARD_DIR, POLICY_DIR = "reward", "reinforce"
# The trainers' settings: copies of recipes/smollm2-135m/{reward,reinforce}/config_qlora.yaml, shipped with the package
# (a test keeps them equal to the repository's files).
RECIPES = Path(__file__).resolve().parent / "recipes"
REWARD_RECIPE, REINFORCE_RECIPE = RECIPES / "reward.yaml", RECIPES / "reinforce.yaml"


def chat_prompt(item: str, template: str = PROMPT) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": template.format(item=item)}]


def split_items(num_held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Training and held-out items: the held-out ones are seen neither by the reward model nor by REINFORCE."""
    items = list(ITEMS)
    random.Random(seed).shuffle(items)
    return items[num_held_out:], items[:num_held_out]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]
