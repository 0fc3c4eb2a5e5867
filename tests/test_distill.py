"""Self-distillation of extra heads (`train --train heads --distill`): kernel parity and a frozen-base run."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from test_loss import grads
from test_train_heads import base_checkpoint

from multitoken.checkpoint import load_model
from multitoken.loss import multi_token_backward, soft_cross_entropy
from multitoken.train import TRAIN_CONFIG, train

from conftest import HEAD_STYLES, tiny_model
from helpers import debug_config, make_dataset, read_metrics


@pytest.mark.parametrize("top_k", [0, 5])
def test_soft_cross_entropy_is_kl_plus_the_teacher_entropy(top_k):
    student_CV, teacher_CV = torch.randn(6, 40), torch.randn(6, 40) * 3
    p_CV = F.softmax(teacher_CV, dim=-1)
    if top_k:  # keep the top entries, renormalised
        kept_CV = torch.zeros_like(p_CV).scatter(-1, p_CV.topk(top_k, dim=-1).indices, 1.0)
        p_CV = p_CV * kept_CV / (p_CV * kept_CV).sum(-1, keepdim=True)
    log_q_CV = F.log_softmax(student_CV, dim=-1)
    entropy = -(p_CV * p_CV.clamp(min=1e-30).log()).sum()
    expected = F.kl_div(log_q_CV, p_CV, reduction="sum") + entropy
    torch.testing.assert_close(soft_cross_entropy(student_CV, teacher_CV, top_k), expected)


@pytest.mark.parametrize("style", HEAD_STYLES)
@pytest.mark.parametrize("top_k", [0, 5])
def test_chunked_distillation_equals_the_reference(style, top_k):
    offsets = None if style == "sequential" else [1, 2, 4]
    model = tiny_model(n_future=3, head_style=style, head_offsets=offsets, loss_weights=[1, 0.5, 0.3])
    reference = copy.deepcopy(model)
    tokens_BT = torch.randint(0, 97, (3, 24))
    tokens_BT[0, 7] = tokens_BT[2, 15] = 5  # document separators
    kwargs = dict(sep_id=5, distill=True, distill_top_k=top_k)
    losses = multi_token_backward(model, tokens_BT, chunk_size=7, **kwargs)
    reference_losses = multi_token_backward(reference, tokens_BT, memory_efficient=False, **kwargs)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    hard = multi_token_backward(copy.deepcopy(model), tokens_BT, sep_id=5)
    assert losses[0] == pytest.approx(hard[0], rel=1e-5)  # the next-token head keeps its labels
    ours, theirs = grads(model), grads(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)


def test_distillation_reference_targets_the_next_token_distribution_k_minus_1_ahead():
    """Independent of the kernels: the loss of head 2 (offset 3) is the mean over t of H(p(t+2), q_3(t))."""
    model = tiny_model(n_future=2, head_style="linear", head_offsets=[1, 3])
    tokens_BT = torch.randint(6, 97, (2, 16))
    losses = multi_token_backward(model, tokens_BT, distill=True)
    with torch.no_grad():
        logits_BTNV = model(tokens_BT)
    p_BTV = F.softmax(logits_BTNV[:, 2:-1, 0], dim=-1)  # teachers at t + 2 for t = 0 .. T - 4
    log_q_BTV = F.log_softmax(logits_BTNV[:, :-3, 1], dim=-1)
    assert losses[1] == pytest.approx(-(p_BTV * log_q_BTV).sum(-1).mean().item(), rel=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("distill"))


def distill_loss(model, tokens_BT):
    return multi_token_backward(copy.deepcopy(model), tokens_BT, memory_efficient=False, distill=True)[1:]


def test_distilled_heads_learn_the_base_and_leave_its_logits_bitwise_unchanged(data, tmp_path):
    base = base_checkpoint(data, tmp_path / "base", n_future=3, head_style="linear")
    cfg = debug_config(data, tmp_path / "run", model={}, init_from=str(tmp_path / "base"), train="heads")
    cfg.distill, cfg.max_steps = True, 12
    train(cfg)
    trained = load_model(tmp_path / "run")
    tokens_BT = torch.randint(0, base.config.vocab_size, (4, 32))
    with torch.no_grad():
        assert torch.equal(base.eval()(tokens_BT)[:, :, 0], trained(tokens_BT)[:, :, 0])
    before, after = distill_loss(base, tokens_BT), distill_loss(trained, tokens_BT)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    logged = read_metrics(tmp_path / "run")
    steps = [m for m in logged if "distill_head2" in m]
    assert len(steps) == 12 and "loss_head2" not in steps[0]
    assert steps[-1]["distill_head3"] < steps[0]["distill_head3"]


def test_a_run_saved_before_the_distill_fields_existed_resumes(data, tmp_path):
    train(debug_config(data, tmp_path / "run", max_steps=2))
    saved_path = tmp_path / "run" / TRAIN_CONFIG
    saved = json.loads(saved_path.read_text())
    del saved["distill"], saved["distill_top_k"]  # as older versions wrote it
    saved_path.write_text(json.dumps(saved))
    train(debug_config(data, tmp_path / "run", max_steps=3, resume=True))
    assert read_metrics(tmp_path / "run")[-1]["step"] == 3
