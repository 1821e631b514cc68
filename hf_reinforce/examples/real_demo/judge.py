"""The gold judge the models never see: VADER's compound sentiment score (the `real` extra's vaderSentiment)."""

import collections
import functools
import re

from hf_reinforce.tools.gguf import require_real_extra


@functools.cache
def sentiment_analyzer():
    """VADER, imported only here: it is in the `real` extra of this package, not a dependency."""
    require_real_extra("The gold judge of `hf-reinforce real-demo` (VADER)", ("vaderSentiment",))
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_score(text: str) -> float:
    """The gold judge: VADER's compound sentiment score of the answer, in [-1, 1]."""
    return sentiment_analyzer().polarity_scores(text)["compound"]


# Function words that a fluent sentence may well use three times; any other word three times is a repetition.
FUNCTION_WORDS = frozenset(
    "a an and are as at be but by for from has have in is it its of on or that the their this to was were with".split()
)


def repeats_a_word(text: str, times: int = 3) -> bool:
    """Whether an answer uses some content word `times` times or more: VADER sums the sentiment of the words it
    knows, so a policy can raise the gold by repeating a warm word ("perfect, perfect, perfect")."""
    words = [word for word in re.findall(r"[a-z']+", text.lower()) if word not in FUNCTION_WORDS]
    return any(count >= times for count in collections.Counter(words).values())


def gold(completions: list, **kwargs) -> list[float]:
    """The gold reward, logged next to the learned one (with weight 0: REINFORCE never optimises it)."""
    return [gold_score(completion[-1]["content"]) for completion in completions]
