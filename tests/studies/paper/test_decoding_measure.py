"""The experiments' decoding measurement drafts with the contiguous heads only, as generate() does."""

from multitoken.generate import generate, merge_stats
from multitoken.studies.paper.decoding import measure_speculative

from conftest import tiny_model

PROMPTS = [[1, 2, 3], [5, 6, 7, 8]]


def test_far_offsets_draft_with_the_offset_two_head_only():
    # Offsets [1, 2, 4, 8]: only +2 can draft (the +4 head does not predict the token after +2's).
    model = tiny_model(0, n_future=4, head_offsets=[1, 2, 4, 8]).eval()
    result = measure_speculative(model, PROMPTS, 8)
    assert len(result.acceptance_per_head) == 1
    assert result.identical == 1.0


def test_stats_are_those_of_generate_merged():
    model = tiny_model(1, n_future=3).eval()
    result = measure_speculative(model, PROMPTS, 8)
    parts = [generate(model, [p], 8, speculative=True).stats for p in PROMPTS]
    merged = merge_stats(parts)
    assert result.acceptance_per_head == merged.acceptance_per_head
    assert result.tokens_per_forward == merged.tokens_per_forward
