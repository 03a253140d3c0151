"""tokprune.spec.generate: greedy output token-identical to model.generate for every drafter (tiny
Llama / Qwen2, batch 1 and padded batch 2, EOS, max length; real SmolLM2-135M), draft-cache
correctness (a self-draft is always accepted), Token Recycling state, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from tests import models as tiny
from tokprune.spec import (DraftModelDrafter, LayerSkipDrafter, TokenRecyclingDrafter, generate, layer_skip_model)

DRAFTERS = {
    "token_recycling": lambda m: TokenRecyclingDrafter(k=4, budget=12),
    "layerskip_dyspec": lambda m: LayerSkipDrafter(m, 1, tree="dyspec", budget=10, width=3),
    "layerskip_rsd": lambda m: LayerSkipDrafter(m, 2, tree="rsd", branching=(3, 2, 1)),
    "draftmodel_specinfer": lambda m: DraftModelDrafter(tiny.tiny_llama(num_hidden_layers=1), tree="specinfer",
                                                        branching=(2, 2)),
    "layerskip_dyspec_exact": lambda m: LayerSkipDrafter(m, 2, tree="dyspec", budget=6, exact=True),
    "layerskip_rsd_s": lambda m: LayerSkipDrafter(m, 2, tree="rsd_s", beam_width=3, depth=2),
    "token_recycling_paper": lambda m: TokenRecyclingDrafter(k=8, template="paper"),
}
MODELS = {"llama": tiny.tiny_llama, "qwen2": tiny.tiny_qwen2}


def prompts(batch: int, seed: int = 1, length: int = 12, pad: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 150, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :pad] = 0
        ids[1, :pad] = 0
    return ids, mask


def hf_greedy(model, ids, mask, **kw):
    return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("drafter_name", list(DRAFTERS))
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_identical_to_hf_generate(model_name, drafter_name, batch):
    model = MODELS[model_name]()
    ids, mask = prompts(batch)
    ref = hf_greedy(model, ids, mask, max_new_tokens=20, eos_token_id=None)
    out, stats = generate(model, ids, attention_mask=mask, drafter=DRAFTERS[drafter_name](model),
                          max_new_tokens=20, eos_token_id=None, pad_token_id=0, return_stats=True)
    assert torch.equal(out, ref), f"\n{out[:, 12:]}\n{ref[:, 12:]}"
    assert stats.new_tokens == 20 * batch
    # the prefill gives 1 token, each tree forward gives accept_len + 1 >= 1 per row
    assert stats.target_forwards <= 19
    assert stats.accepted_draft_tokens + stats.row_steps >= 19 * batch


@pytest.mark.parametrize("drafter_name", ["token_recycling", "layerskip_dyspec", "layerskip_rsd"])
def test_eos_stops_rows_like_hf(drafter_name):
    model = tiny.tiny_llama()
    ids, mask = prompts(2, seed=3)
    free = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=None)
    eos = int(free[0, 12 + 6])  # a token row 0 emits at step 7
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=eos)
    out = generate(model, ids, attention_mask=mask, drafter=DRAFTERS[drafter_name](model), max_new_tokens=24,
                   eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref), f"\n{out[:, 12:]}\n{ref[:, 12:]}"
    assert int((out[0, 12:] == eos).nonzero()[0]) <= 6
    # the default EOS is the model's generation_config.eos_token_id, like model.generate
    ref_default = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    out_default = generate(model, ids, attention_mask=mask, drafter=DRAFTERS[drafter_name](model),
                           max_new_tokens=24, pad_token_id=0)
    assert torch.equal(out_default, ref_default)


@pytest.mark.parametrize("max_new", [0, 1, 2, 7])
def test_max_new_tokens(max_new):
    model = tiny.tiny_qwen2()
    ids, mask = prompts(2)
    ref = hf_greedy(model, ids, mask, max_new_tokens=max_new, eos_token_id=None) if max_new else ids
    out = generate(model, ids, attention_mask=mask, drafter=TokenRecyclingDrafter(k=4, budget=16),
                   max_new_tokens=max_new, eos_token_id=None)
    assert torch.equal(out, ref)


def test_self_draft_is_always_accepted():
    """A layer-skip 'draft' with ALL layers is the target: a chain of 4 is accepted every step, which
    checks the draft cache (pending tokens, tree mask, positions, cropping)."""
    model = tiny.tiny_llama()
    ids, mask = prompts(2)
    drafter = LayerSkipDrafter(model, 3, tree="topk", branching=(1, 1, 1, 1))
    out, stats = generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=21, eos_token_id=None,
                          pad_token_id=0, return_stats=True)
    assert torch.equal(out, hf_greedy(model, ids, mask, max_new_tokens=21, eos_token_id=None))
    assert stats.accept_lens == [4] * (2 * 4)  # 1 + 4 steps x 5 tokens = 21
    assert stats.target_forwards == 4
    # DySpec trees with the same self-draft also accept their whole greedy chain
    drafter = LayerSkipDrafter(model, 3, tree="dyspec", budget=8, width=2, max_children=2)
    out, stats = generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=21, eos_token_id=None,
                          pad_token_id=0, return_stats=True)
    assert torch.equal(out, hf_greedy(model, ids, mask, max_new_tokens=21, eos_token_id=None))
    assert min(stats.accept_lens) >= 2


def test_self_draft_sampling_accepts_everything_with_rsd_rsd_s_and_specinfer():
    """With q == p, the stochastic rules accept the first child of every node: accept_len = depth."""
    model = tiny.tiny_llama()
    ids, mask = prompts(2)
    for tree in ("rsd", "specinfer", "rsd_s"):
        # rsd_s: the path of each level's maximum survives the stochastic beam (it inherits the top value)
        drafter = LayerSkipDrafter(model, 3, tree=tree, branching=(2, 1, 1), beam_width=2, depth=3)
        out, stats = generate(model, ids, attention_mask=mask, drafter=drafter, max_new_tokens=13, do_sample=True,
                              temperature=0.8, eos_token_id=None, generator=torch.Generator().manual_seed(0),
                              return_stats=True)
        assert stats.accept_lens == [3] * (2 * 3), tree
        assert out.shape == (2, 25)


def test_layer_skip_model_shares_weights_and_runs_prefix_layers():
    model = tiny.tiny_llama()
    draft = layer_skip_model(model, 2)
    assert len(draft.model.layers) == 2 and len(model.model.layers) == 3
    assert draft.lm_head.weight is model.lm_head.weight and draft.model.layers[1] is model.model.layers[1]
    assert draft.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 3
    ids = torch.randint(0, 160, (1, 7))
    hidden = model(ids, output_hidden_states=True).hidden_states[2]  # after 2 layers
    expected = model.lm_head(model.model.norm(hidden))
    torch.testing.assert_close(draft(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        layer_skip_model(model, 4)


def test_token_recycling_adjacency_learns_from_target():
    from tokprune.spec import DraftContext

    model = tiny.tiny_llama()
    ids, mask = prompts(1)
    logits = model(ids).logits
    ctx = DraftContext(model=model, input_ids=ids, attention_mask=mask, vocab_size=160, prompt_logits=logits)
    # the paper's mode (default): the prompt's logits are not used, the matrix starts empty
    paper = TokenRecyclingDrafter(k=4, budget=8)
    assert not paper.needs_prompt_logits
    paper.begin(ctx)
    assert torch.equal(paper.adjacency, torch.arange(4).repeat(160, 1))
    # tokprune's prompt fill: row t = target top-k after the last occurrence of t in the prompt
    drafter = TokenRecyclingDrafter(k=4, budget=8, prompt_fill=True)
    assert drafter.needs_prompt_logits
    drafter.begin(ctx)
    for pos, t in enumerate(ids[0].tolist()):
        if t not in ids[0, pos + 1:].tolist():
            expect = torch.sort(logits[0, pos], descending=True, stable=True).indices[:4].tolist()
            assert drafter.adjacency[t].tolist() == expect
    # one step: every token of the tree gets the target's top-k at (its last occurrence in) the tree
    root = logits[0, -1].argmax().view(1)
    tree = drafter.propose(root)
    target = torch.randn(1, tree.num_nodes, 160)
    drafter.commit(tree, target, None, None, None)
    toks = tree.tokens[0].tolist()
    for i, t in enumerate(toks):
        if t not in toks[i + 1:]:
            assert drafter.adjacency[t].tolist() == torch.sort(target[0, i], descending=True,
                                                               stable=True).indices[:4].tolist()
    # the matrix persists across calls (hot start): a second identical call needs fewer forwards
    _, s1 = generate(model, ids, drafter=TokenRecyclingDrafter(k=4, budget=8), max_new_tokens=16,
                     eos_token_id=None, return_stats=True)
    warm = TokenRecyclingDrafter(k=4, budget=8)
    generate(model, ids, drafter=warm, max_new_tokens=16, eos_token_id=None)
    out2, s2 = generate(model, ids, drafter=warm, max_new_tokens=16, eos_token_id=None, return_stats=True)
    assert torch.equal(out2, hf_greedy(model, ids, torch.ones_like(ids), max_new_tokens=16, eos_token_id=None))
    assert s2.target_forwards < s1.target_forwards


@pytest.mark.parametrize("drafter_name", list(DRAFTERS))
def test_sampling_is_seeded_and_valid(drafter_name):
    model = tiny.tiny_qwen2()
    ids, mask = prompts(2)

    def run(seed):
        return generate(model, ids, attention_mask=mask, drafter=DRAFTERS[drafter_name](model), max_new_tokens=12,
                        do_sample=True, temperature=0.9, top_k=50, top_p=0.95, eos_token_id=None,
                        generator=torch.Generator().manual_seed(seed), return_stats=True)

    a, stats = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (2, 24) and torch.equal(a[:, :12], ids)
    assert int(a.min()) >= 0 and int(a.max()) < 160
    assert stats.new_tokens == 24


def test_input_errors():
    model = tiny.tiny_llama()
    ids, _ = prompts(1)
    d = TokenRecyclingDrafter(budget=8)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], drafter=d)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, drafter=d, max_new_tokens=-1)
    with pytest.raises(TypeError, match="drafter"):
        generate(model, ids, drafter=object())
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, ids, drafter=d, attention_mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, drafter=d, do_sample=True, temperature=0.0)


REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which",
    "import torch\n\nclass MLP(torch.nn.Module):\n    def __init__(self, dim):\n",
]


@pytest.mark.real_weights
@pytest.mark.slow
def test_real_smollm2_greedy_identical(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    enc = tok(REAL_PROMPTS, return_tensors="pt", padding=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ref = model.generate(**enc, do_sample=False, max_new_tokens=32, pad_token_id=pad)
    for drafter in (TokenRecyclingDrafter(k=8, budget=16),
                    LayerSkipDrafter(model, 8, tree="dyspec", budget=8, width=4)):
        out, stats = generate(model, enc.input_ids, attention_mask=enc.attention_mask, drafter=drafter,
                              max_new_tokens=32, pad_token_id=pad, return_stats=True)
        assert torch.equal(out, ref), (type(drafter).__name__, tok.batch_decode(out[:, enc.input_ids.shape[1]:]),
                                       tok.batch_decode(ref[:, enc.input_ids.shape[1]:]))
        assert stats.tokens_per_forward > 1.0
