"""ICL retrieval: queries by their prompt, selected examples whole (prompt and response)."""

from __future__ import annotations

import numpy as np

from delift.icl import nearest_demonstrations
from delift.records import make_record


class BagOfWordsEmbedder:
    """Unit word-count vectors over a fixed vocabulary, so cosines are known by hand; records what it embeds."""

    vocabulary = ("paris", "france", "banana", "apple", "kiwi", "mango")

    def __init__(self):
        self.seen = []

    def encode(self, texts):
        self.seen.extend(texts)
        vectors = np.array([[text.split().count(word) for word in self.vocabulary] for text in texts], dtype=float)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_the_response_is_embedded_and_changes_the_nearest_demonstration():
    query = make_record("q", "", "paris france", "")
    # By prompt alone, `same_prompt` is the query's twin (cosine 1) and `short_prompt` shares one word
    # of two (1/sqrt 2). Whole: `same_prompt` is diluted by four other words (2 / (sqrt 2 sqrt 6) = 0.58),
    # while `short_prompt`'s response completes the query's words (cosine 1).
    same_prompt = make_record("s1", "", "paris france", "banana apple kiwi mango")
    short_prompt = make_record("s2", "", "paris", "france")
    embedder = BagOfWordsEmbedder()
    assert nearest_demonstrations([query], [same_prompt, short_prompt], embedder, k=2) == [[short_prompt, same_prompt]]
    assert embedder.seen == ["paris france", "paris france\nbanana apple kiwi mango", "paris\nfrance"]


def test_ties_keep_subset_order_and_k_is_capped():
    query = make_record("q", "", "paris", "")
    first, second = make_record("a", "", "paris", "kiwi"), make_record("b", "", "paris", "mango")
    assert nearest_demonstrations([query], [first, second], BagOfWordsEmbedder(), k=5) == [[first, second]]
    assert nearest_demonstrations([query], [], BagOfWordsEmbedder()) == [[]]
