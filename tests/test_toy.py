"""The toy triplets: positive and hard negatives are equally close to the query in wording, differ in meaning."""
import pytest

from are_fast.toy.data import SLOTS, compression_rows, triplet_rows

_MEANING = {word: (slot, m) for slot, values in enumerate(SLOTS) for m, synonyms in enumerate(values) for word in synonyms}


def _parse(text):
    """The (slot, meaning) of each of the 4 slots of a rendered sentence, and its words per slot."""
    rest, words = text.removeprefix("the "), []
    for slot in range(len(SLOTS)):
        word = next(w for w in sorted(_MEANING, key=len, reverse=True)
                    if _MEANING[w][0] == slot and rest.startswith(w))
        words.append(word)
        rest = rest[len(word):].lstrip()
    assert rest == "", text
    return [_MEANING[w][1] for w in words], words


def test_positive_and_hard_negatives_differ_from_the_query_in_one_word():
    for row in triplet_rows(200, 3, seed=5):
        meaning, words = _parse(row["query"])
        pos_meaning, pos_words = _parse(row["pos"])
        assert pos_meaning == meaning and sum(a != b for a, b in zip(words, pos_words)) == 1  # a synonym
        changed = []
        for neg in row["neg"]:
            neg_meaning, neg_words = _parse(neg)
            diff = [s for s in range(len(SLOTS)) if neg_words[s] != words[s]]
            assert len(diff) == 1 and neg_meaning[diff[0]] != meaning[diff[0]]  # another meaning, same words elsewhere
            changed.append(diff[0])
        assert len(set(changed)) == len(changed)  # each negative changes a different slot
    with pytest.raises(ValueError, match="num_negatives: expected 1 to 4"):
        triplet_rows(1, 5)


def test_stage1_outputs_restate_the_context_with_other_synonyms():
    for row in compression_rows(100, seed=2):
        (meaning, words), (out_meaning, out_words) = _parse(row["context"]), _parse(row["output"])
        assert out_meaning == meaning and all(a != b for a, b in zip(words, out_words))
