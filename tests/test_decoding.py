"""The decoding steps driven as a server drives them: rows join (chunked prefill) and leave between steps."""

import pytest
import torch
from test_generate import agreeing_model
from test_speculative import make_stub

from multitoken.decoding import DecodeBatch, DraftPlan, _draft, decode_step, prefill
from multitoken.draft_policy import DraftPolicy
from multitoken.generate import generate
from multitoken.sampling import RowSampling, SamplingParams, sampling_probs
from multitoken.step_costs import StepCosts

from conftest import tiny_model

PROMPTS = {"a": [1, 2, 3], "b": [5, 6, 7, 8, 9, 10, 11, 12, 13], "c": [4, 4]}
N_NEW = 12


class Driver:
    """A minimal continuous-batching loop: live rows are 0 .. n-1, a new row is prefilled at row n."""

    def __init__(self, model, plan, capacity=3):
        self.batch = DecodeBatch(model, capacity, 64, extra_slots=8)
        self.plan, self.names, self.out = plan, [], {}

    def join(self, name, chunk_sizes=None):
        prompt, row = PROMPTS[name], len(self.names)
        self.batch.set_sampling(row, SamplingParams())
        chunks = chunk_sizes or [len(prompt)]
        start = 0
        for i, size in enumerate(chunks):
            final = i == len(chunks) - 1
            record = prefill(
                self.batch, [prompt[start : start + size]], first_row=row, start=[start], final=final
            )
            start += size
            if not final:
                self.step()  # the running rows keep decoding between chunks
        self.names.append(name)
        self.out[name] = list(record.tokens[0])

    def step(self):
        if not self.names:
            return
        budget = [N_NEW - len(self.out[name]) for name in self.names]
        record = decode_step(self.batch, self.plan, budget)
        for name, tokens in zip(self.names, record.tokens, strict=True):
            self.out[name] += tokens
        done = [i for i, name in enumerate(self.names) if len(self.out[name]) >= N_NEW]
        if done:
            keep = [i for i in range(len(self.names)) if i not in done]
            self.batch.keep_rows(keep)
            self.names = [self.names[i] for i in keep]


@pytest.mark.parametrize("style", ["transformer", "linear", "sequential", "conditioned"])
@pytest.mark.parametrize("plan", ["plain", "chain", "tree"])
def test_rows_joining_and_leaving_decode_as_alone(style, plan):
    if plan == "tree" and style == "sequential":
        pytest.skip("trees need parallel heads")
    for model in (tiny_model(2, n_future=3, head_style=style).double().eval(), agreeing_model(style, 3)):
        solo = {name: generate(model, [p], N_NEW, speculative=False).tokens[0] for name, p in PROMPTS.items()}
        from multitoken.draft_tree import DraftTree

        plans = {
            "plain": DraftPlan.chain(0),
            "chain": DraftPlan.chain(2),
            "tree": DraftPlan.of_tree(DraftTree.from_widths([3, 2]).tensors("cpu"), "tree"),
        }
        driver = Driver(model, plans[plan])
        driver.join("a")
        driver.step()
        driver.join("b", chunk_sizes=[4, 3, 2])  # chunked prefill while "a" decodes
        for _ in range(3):
            driver.step()
        driver.join("c")
        while driver.names:
            driver.step()
        for name in PROMPTS:
            assert driver.out[name][:N_NEW] == solo[name], name
        driver.batch.close()


@pytest.mark.parametrize("style", ["transformer", "linear", "medusa", "conditioned"])
def test_drafts_are_the_heads_predictions_over_the_known_text(style):
    """A step's drafts are each drafting head's top token at the last committed position of the text
    so far, pending token included (what conditioned heads read there), as a full pass computes them."""
    model = tiny_model(3, n_future=4, head_style=style).double().eval()
    with torch.no_grad():  # heads that depend strongly on what they read
        for head in list(model.heads)[1:]:
            for param in head.parameters():
                if param.dim() == 2:
                    param.normal_(0, 0.3)
    prompts = [[5, 6, 7, 8, 9], [1, 2, 3]]
    batch = DecodeBatch(model, 2, 64)
    batch.sampling, batch.n_rows = SamplingParams(), 2
    texts = [list(p) + t for p, t in zip(prompts, prefill(batch, prompts).tokens, strict=True)]
    for _ in range(4):  # plain steps: the heads' state must follow the text as it grows
        for text, new in zip(texts, decode_step(batch, DraftPlan.chain(0), [99, 99]).tokens, strict=True):
            text += new
    drafts_BJ = _draft(batch, DraftPlan.chain(3), 2, batch.sampling)[0]
    batch.close()
    for b, text in enumerate(texts):
        tokens_1T = torch.tensor([text])
        rope = model.rope_context(tokens_1T, None)
        states = model.head_states(model.trunk_forward(tokens_1T, rope), tokens_1T, rope)
        expected = [int(model.logits(z_1TD)[0, -2].argmax()) for z_1TD in states[1:]]
        assert drafts_BJ[b].tolist() == expected


def test_row_sampling_equals_shared_sampling_row_by_row():
    torch.manual_seed(0)
    logits_BTV = torch.randn(4, 3, 11) * 3
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, top_k=2, top_p=0.9),
    ]
    rows = sampling_probs(logits_BTV, RowSampling.build(params, "cpu"))
    for b, p in enumerate(params):
        torch.testing.assert_close(rows[b], sampling_probs(logits_BTV[b], p))
    assert not RowSampling.build(params, "cpu").greedy and RowSampling.build(params[:1], "cpu").greedy


def test_a_greedy_row_among_sampled_rows_decodes_greedily():
    model = agreeing_model("linear", 3)
    solo = generate(model, [PROMPTS["b"]], N_NEW, speculative=False).tokens[0]
    batch = DecodeBatch(model, 3, 64)
    for row, params in enumerate(
        [SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.5)]
    ):
        batch.set_sampling(row, params)
    batch.generator = torch.Generator().manual_seed(0)
    record = prefill(batch, [PROMPTS["a"], PROMPTS["b"], PROMPTS["c"]])
    tokens = record.tokens[1]
    while len(tokens) < N_NEW:
        tokens += decode_step(batch, DraftPlan.chain(2), [N_NEW] * 3).tokens[1]
    assert tokens[:N_NEW] == solo
    assert not batch.live_sampling(slice(0, 3)).greedy and batch.live_sampling(slice(1, 2)).greedy
    batch.sampling = RowSampling.build([SamplingParams(), SamplingParams(temperature=1.0)], "cpu")
    assert batch.live_sampling(slice(0, 1)).greedy and not batch.live_sampling(slice(0, 2)).greedy
    batch.close()


class ShadowEveryStep(DraftPolicy):
    """Every step a shadow probe: plain decoding that scores the +2 head's guess."""

    def __init__(self):
        super().__init__(1, StepCosts(), trees=False, device="cpu", vocab_size=97)
        self.hits, self.judged = 0, 0

    def choose(self, batch_size):
        return DraftPlan.shadow_probe()

    def observe(self, record, batch_size, seconds=None):
        self.hits += record.accepted_J[0]
        self.judged += record.reached_J[0]


def test_a_shadow_probe_scores_the_guess_a_one_draft_chain_would_verify():
    """Plain output, and a hit wherever the +2 head at the last committed position is right."""
    right = lambda b, i, t: t % 3 == 0  # noqa: E731
    stub = make_stub(1, 2, right, head_style="linear", S=80)
    prompt = stub.seq_BS[0, :5].tolist()
    policy = ShadowEveryStep()
    out = generate(stub, [prompt], 40, policy=policy, seed=0)
    assert out.tokens == [stub.seq_BS[0, 5:45].tolist()] and out.stats.plans == {"probe": 39}
    # The step whose pending token sits at p scores the guess made at p - 1 for p + 1.
    judged = range(5, 5 + 38)  # the last step's row has budget 1: nothing to judge
    assert policy.judged == len(judged) and policy.hits == sum(right(0, 1, p - 1) for p in judged)
    assert out.stats.drafts_proposed == [0]  # shadow guesses are not drafts
