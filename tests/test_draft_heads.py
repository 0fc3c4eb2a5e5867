"""The stacked drafting heads (`model.drafting_states`) compute what each head computes on its own
(`model.head_forward`)."""

import pytest
import torch

from multitoken.draft_heads import FusedDraftHeads

from conftest import tiny_model


def reference_states(model, h_BD, next_B, n):
    return torch.stack([model.head_forward(j, h_BD, None, next_B) for j in range(1, n + 1)], dim=1)


@pytest.mark.parametrize("style", ["linear", "medusa", "conditioned"])
def test_stacked_heads_equal_each_head_on_its_own(style):
    model = tiny_model(head_style=style, n_future=4).eval()
    if style == "medusa":
        with torch.no_grad():
            for head in model.heads[1:]:
                head.proj.bias.normal_(0, 0.1)
    h_BD = torch.randn(3, model.config.dim)
    next_B = torch.randint(0, model.config.vocab_size, (3,))
    with torch.no_grad():
        for n in (1, 2, 3):
            torch.testing.assert_close(
                model.drafting_states(h_BD, next_B, n), reference_states(model, h_BD, next_B, n)
            )


def test_stacked_heads_follow_changed_weights():
    """Training in place, loading new weights and replacing a head between generations all reach the
    stacked copy."""
    model = tiny_model(head_style="conditioned", n_future=4).eval()
    fused = FusedDraftHeads.for_model(model)
    assert FusedDraftHeads.for_model(model) is fused
    h_BD, next_B = torch.randn(2, model.config.dim), torch.tensor([1, 2])
    with torch.no_grad():
        before = fused.states(h_BD, next_B, 3)
        model.heads[3].proj.weight.mul_(-2.0)  # an optimizer step: same storage, new version
        after_step = fused.states(h_BD, next_B, 3)
        torch.testing.assert_close(after_step, reference_states(model, h_BD, next_B, 3))
        assert not torch.equal(after_step[:, 2], before[:, 2])
        torch.testing.assert_close(after_step[:, :2], before[:, :2])
        state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        torch.testing.assert_close(fused.states(h_BD, next_B, 3), reference_states(model, h_BD, next_B, 3))
        model.heads[2] = type(model.heads[2])(model.config)  # a head replaced by a new one
        torch.testing.assert_close(fused.states(h_BD, next_B, 3), reference_states(model, h_BD, next_B, 3))


def test_heads_with_attention_are_not_stacked():
    with pytest.raises(ValueError, match="cannot be fused"):
        FusedDraftHeads(tiny_model(head_style="transformer", n_future=3))
