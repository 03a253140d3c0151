"""Token-tree ops: tree utilities, masks, greedy/stochastic verification, KV compaction.

Every backend is compared with the plain-torch oracle in tokprune.reference.spec (contract: the
docstring of tokprune.ops.spec). The Triton and CUDA backends run on ``TOKPRUNE_TEST_DEVICE`` tensors
(CPU: interpreter / host build; ``cuda``: the real kernels) and are compared on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_close, dev, host, needs_backend
from tokprune._backend import BackendUnavailable
from tokprune.ops import spec as S
from tokprune.reference import spec as R

needs_triton = needs_backend("triton")


def random_tree(bsz: int, n: int, pad: float = 0.0, branch: int = 0, gen=None, dtype=torch.int32) -> torch.Tensor:
    """Random canonical tree: each active node picks a parent among earlier active nodes; a fraction
    ``pad`` of nodes are padding. ``branch > 0`` biases towards the ``branch`` most recent nodes (deeper)."""
    par = torch.full((bsz, n), -1, dtype=dtype)
    for b in range(bsz):
        active = [0]
        for i in range(1, n):
            if torch.rand((), generator=gen) < pad:
                continue
            pool = active[-branch:] if branch else active
            par[b, i] = pool[int(torch.randint(len(pool), (), generator=gen))]
            active.append(i)
    return par


def planted_tokens(par: torch.Tensor, logits: torch.Tensor, frac: float = 0.6) -> torch.Tensor:
    """Tokens that equal the target argmax of the parent with probability ``frac`` (long accepted paths)."""
    bsz, n, vocab = logits.shape
    best = logits.argmax(-1).gather(1, par.long().clamp_min(0))
    return torch.where(torch.rand(bsz, n) < frac, best, torch.randint(vocab, (bsz, n)))


def assert_same(actual, expected, name="result"):
    for a, e, part in zip(host(*actual), host(*expected), ("accept_index", "accept_len", "next_token")):
        assert a.dtype == torch.int64, f"{name}.{part} dtype {a.dtype}"
        assert_close(a, e, name=f"{name}.{part}")


def chain(n):
    return torch.arange(-1, n - 1, dtype=torch.int32).unsqueeze(0)


def star(n):
    par = torch.zeros(1, n, dtype=torch.int32)
    par[0, 0] = -1
    return par


# ------------------------------------------------------------------------------------------ structure

@pytest.mark.parametrize("pad", [0.0, 0.3])
def test_depths_ancestors_links_paths_round_trip(pad):
    gen = torch.Generator().manual_seed(1)
    for trial in range(10):
        par = random_tree(4, 17, pad=pad, branch=3 if trial % 2 else 0, gen=gen)
        assert_close(S.tree_depths(par), R.tree_depths_reference(par), name="depth")
        assert torch.equal(S._ancestors(par.long()), R.ancestor_matrix_reference(par))
        fc, ns = S.tree_to_links(par)
        assert fc.dtype == par.dtype
        assert torch.equal(S.links_to_tree(fc, ns), par)
        paths = S.tree_to_paths(par)
        assert torch.equal(S.paths_to_tree(paths, par.shape[1]), par)
        # every path row is a root-to-leaf chain: consecutive entries are parent -> child
        valid = paths >= 0
        assert bool((paths[:, :, 0][valid[:, :, 0]] == 0).all())
        child, parent = paths[:, :, 1:], paths[:, :, :-1]
        ok = child >= 0
        got = par.long().gather(1, child.clamp_min(0).flatten(1)).view_as(child)
        assert torch.equal(got[ok], parent[ok])


def test_links_and_paths_known_tree():
    #      0
    #    1   2
    #   3 4   5
    par = torch.tensor([[-1, 0, 0, 1, 1, 2]], dtype=torch.int32)
    fc, ns = S.tree_to_links(par)
    assert fc.tolist() == [[1, 3, 5, -1, -1, -1]]
    assert ns.tolist() == [[-1, 2, -1, 4, -1, -1]]
    assert S.tree_to_paths(par).tolist() == [[[0, 1, 3], [0, 1, 4], [0, 2, 5]]]
    assert S.tree_positions(par, 7).tolist() == [[7, 8, 8, 9, 9, 9]]
    assert S.tree_positions(par, torch.tensor([3])).tolist() == [[3, 4, 4, 5, 5, 5]]


def test_root_only_tree_structure():
    par = torch.tensor([[-1], [-1]], dtype=torch.int32)
    assert S.tree_to_paths(par).tolist() == [[[0]], [[0]]]
    assert S.tree_depths(par).tolist() == [[0], [0]]
    fc, ns = S.tree_to_links(par)
    assert fc.tolist() == [[-1], [-1]] and ns.tolist() == [[-1], [-1]]


def test_attention_mask_matches_ancestors_and_prefix_padding():
    par = random_tree(3, 9, pad=0.2, gen=torch.Generator().manual_seed(3))
    prefix_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        mask = S.tree_attention_mask(par, 4, dtype, prefix_mask=prefix_mask)
        assert mask.shape == (3, 1, 9, 13) and mask.dtype == dtype
        allowed = mask[:, 0] == 0
        assert bool((mask[:, 0][~allowed] == torch.finfo(dtype).min).all())
        assert torch.equal(allowed[:, :, 4:], R.ancestor_matrix_reference(par))
        assert torch.equal(allowed[:, :, :4], prefix_mask.bool().unsqueeze(1).expand(3, 9, 4))
    nomask = S.tree_attention_mask(par, 0)
    assert nomask.shape == (3, 1, 9, 9)


@pytest.mark.parametrize("word_bits", [32, 64])
def test_packed_mask_round_trip(word_bits):
    par = random_tree(2, 70, branch=4, gen=torch.Generator().manual_seed(5))
    packed = S.tree_mask_packed(par, word_bits=word_bits)
    assert packed.dtype == (torch.int32 if word_bits == 32 else torch.int64)
    assert packed.shape == (2, 70, -(-70 // word_bits))
    assert torch.equal(S.unpack_tree_mask(packed, 70), R.ancestor_matrix_reference(par))
    # chain: row i has bits 0..i set
    c = S.tree_mask_packed(chain(33), word_bits=32)
    assert c[0, 31, 0].item() == -1 and c[0, 32, 1].item() == 1 and c[0, 32, 0].item() == -1


def test_tree_validation_errors():
    with pytest.raises(ValueError, match=r"parents\[b, 0\] must be -1"):
        S.tree_depths(torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="topological order"):
        S.tree_depths(torch.tensor([[-1, 0, 2]]))
    with pytest.raises(ValueError, match="topological order"):
        S.tree_depths(torch.tensor([[-1, -2]]))
    with pytest.raises(ValueError, match="padding nodes cannot have children"):
        S.tree_depths(torch.tensor([[-1, -1, 1]]))
    with pytest.raises(TypeError, match="parents must have dtype"):
        S.tree_depths(torch.tensor([[-1.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one node"):
        S.tree_depths(torch.zeros(1, 0, dtype=torch.int32))
    with pytest.raises(ValueError, match="prefix_len"):
        S.tree_positions(torch.tensor([[-1, 0]]), -1)
    with pytest.raises(ValueError, match="prefix_mask must have shape"):
        S.tree_attention_mask(torch.tensor([[-1, 0]]), 3, prefix_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="word_bits"):
        S.tree_mask_packed(torch.tensor([[-1, 0]]), word_bits=16)


# ------------------------------------------------------------------------------------------ greedy

@pytest.mark.parametrize("pad", [0.0, 0.25])
def test_greedy_matches_reference_random(pad):
    gen = torch.Generator().manual_seed(11)
    for trial in range(12):
        bsz, n, vocab = 6, 15, 5 + trial
        par = random_tree(bsz, n, pad=pad, branch=2 if trial % 2 else 0, gen=gen)
        logits = torch.randn(bsz, n, vocab).round()  # many ties: lowest index must win
        tok = planted_tokens(par, logits)
        assert_same(S.verify_tree_greedy(tok, par, logits), R.verify_tree_greedy_reference(tok, par, logits))


def test_greedy_edge_cases():
    vocab = 10
    # root-only tree: bonus = argmax at root, nothing accepted
    logits = torch.randn(2, 1, vocab)
    ai, al, nt = S.verify_tree_greedy(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), -1), logits)
    assert ai.tolist() == [[0], [0]] and al.tolist() == [0, 0] and torch.equal(nt, logits[:, 0].argmax(-1))
    # chain, all accepted: bonus taken at the deepest node
    n = 6
    logits = torch.randn(1, n, vocab)
    tok = torch.cat([torch.zeros(1, 1, dtype=torch.long), logits[:, :-1].argmax(-1)], dim=1)
    ai, al, nt = S.verify_tree_greedy(tok, chain(n), logits)
    assert ai.tolist() == [list(range(n))] and al.item() == n - 1 and nt.item() == logits[0, -1].argmax().item()
    # all rejected on a star
    tok = (logits[:, :1].argmax(-1) + 1 + torch.arange(n)) % vocab
    tok[0, 1:] = torch.where(tok[0, 1:] == logits[0, 0].argmax(), (tok[0, 1:] + 1) % vocab, tok[0, 1:])
    ai, al, nt = S.verify_tree_greedy(tok, star(n), logits)
    assert al.item() == 0 and ai.tolist() == [[0, -1]] and nt.item() == logits[0, 0].argmax().item()
    # duplicate siblings: the first in sibling order wins
    par = torch.tensor([[-1, 0, 0, 0]])
    logits = torch.zeros(1, 4, vocab)
    logits[0, 0, 3] = 1
    tok = torch.tensor([[9, 2, 3, 3]])
    ai, al, _ = S.verify_tree_greedy(tok, par, logits)
    assert ai.tolist() == [[0, 2]]


def test_greedy_large_vocab_and_low_precision():
    vocab = 128256
    par = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int32).repeat(2, 1)
    logits = torch.randn(2, 5, vocab, dtype=torch.bfloat16)
    tok = planted_tokens(par, logits.float(), frac=1.0)
    tok[1, 1] = (tok[1, 1] + 1) % vocab
    assert_same(S.verify_tree_greedy(tok, par, logits), R.verify_tree_greedy_reference(tok, par, logits))


def test_greedy_errors():
    par = torch.tensor([[-1, 0]])
    with pytest.raises(ValueError, match="target_logits must have shape"):
        S.verify_tree_greedy(torch.zeros(1, 2, dtype=torch.long), par, torch.zeros(1, 3, 4))
    with pytest.raises(IndexError, match=r"tokens of active nodes must lie in \[0, V=4\)"):
        S.verify_tree_greedy(torch.tensor([[0, 4]]), par, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="tokens must have the shape"):
        S.verify_tree_greedy(torch.zeros(1, 3, dtype=torch.long), par, torch.zeros(1, 2, 4))
    bad = torch.zeros(1, 2, 4)
    bad[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        S.verify_tree_greedy(torch.zeros(1, 2, dtype=torch.long), par, bad)
    with pytest.raises(BackendUnavailable, match="unknown"):
        S.verify_tree_greedy(torch.zeros(1, 2, dtype=torch.long), par, torch.zeros(1, 2, 4), backend="nope")


# ------------------------------------------------------------------------------------------ stochastic

def random_probs(shape, sharp=2.0, zero_frac=0.0, gen=None):
    logits = torch.randn(shape, generator=gen) * sharp
    if zero_frac:
        logits = logits.masked_fill(torch.rand(shape, generator=gen) < zero_frac, float("-inf"))
        logits[..., 0] = logits[..., 0].nan_to_num(0.0, neginf=0.0)
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("rule", S.RULES)
@pytest.mark.parametrize("pad", [0.0, 0.25])
def test_stochastic_matches_reference_random(rule, pad):
    gen = torch.Generator().manual_seed(21)
    for trial in range(10):
        bsz, n, vocab = 6, 13, 4 + trial
        par = random_tree(bsz, n, pad=pad, branch=2 if trial % 2 else 0, gen=gen)
        tp = random_probs((bsz, n, vocab), zero_frac=0.3 if trial % 3 == 0 else 0.0, gen=gen)
        dp = random_probs((bsz, n, vocab), zero_frac=0.3 if trial % 3 == 1 else 0.0, gen=gen)
        tok = torch.randint(vocab, (bsz, n), generator=gen)
        u = torch.rand(bsz, n, generator=gen)
        if trial == 4:
            u = torch.full((bsz, n), 1.0 - 2 ** -24)  # largest float32 below 1
        got = S.verify_tree_stochastic(tok, par, tp, dp, rule=rule, uniforms=u)
        assert_same(got, R.verify_tree_stochastic_reference(tok, par, tp, dp, rule, u), name=f"{rule}#{trial}")
        # the accepted path is a chain of the tree and accept_len counts its draft tokens
        ai, al, nt = got
        assert torch.equal((ai >= 0).sum(1) - 1, al)
        assert bool(((nt >= 0) & (nt < vocab)).all())


def test_stochastic_edge_cases():
    vocab = 6
    tp = torch.zeros(1, 4, vocab)
    tp[0, :, 2] = 1.0  # target is deterministic: token 2 everywhere
    dp = torch.full((1, 4, vocab), 1.0 / vocab)
    tok = torch.tensor([[0, 2, 2, 2]])
    u = torch.full((1, 4), 0.999999)
    # all accepted along a chain, bonus at max depth = 2
    for rule in S.RULES:
        ai, al, nt = S.verify_tree_stochastic(tok, chain(4), tp, dp, rule=rule, uniforms=u)
        assert ai.tolist() == [[0, 1, 2, 3]] and al.item() == 3 and nt.item() == 2
    # all rejected on a star of wrong tokens: bonus from the residual is still token 2
    tok_bad = torch.tensor([[0, 1, 3, 4]])
    for rule in S.RULES:
        ai, al, nt = S.verify_tree_stochastic(tok_bad, star(4), tp, dp, rule=rule, uniforms=u)
        assert ai.tolist() == [[0, -1]] and al.item() == 0 and nt.item() == 2
    # zero-probability draft token that the target likes: u * 0 < p[x] -> accepted under specinfer/rsd
    dp0 = dp.clone()
    dp0[..., 2] = 0
    dp0 = dp0 / dp0.sum(-1, keepdim=True)
    ai, al, nt = S.verify_tree_stochastic(tok, chain(4), tp, dp0, rule="rsd", uniforms=u)
    assert al.item() == 3
    # target_only: a duplicate sibling is never accepted after its twin was rejected
    tp2 = torch.full((1, 3, vocab), 1.0 / vocab)
    ai, al, nt = S.verify_tree_stochastic(torch.tensor([[0, 4, 4]]), star(3), tp2, rule="target_only",
                                          uniforms=torch.tensor([[0.5, 0.9, 0.0]]))
    assert al.item() == 0 and nt.item() != 4


def test_stochastic_logits_processing_and_generator():
    gen = torch.Generator().manual_seed(0)
    par = random_tree(3, 9, gen=gen)
    logits = torch.randn(3, 9, 50, generator=gen)
    tok = torch.randint(50, (3, 9), generator=gen)
    dp = random_probs((3, 9, 50), gen=gen)
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(top_p=0.8), dict(top_k=7, top_p=0.5)):
        u = torch.rand(3, 9, generator=gen)
        tp = S.process_logits(logits, **kw)
        got = S.verify_tree_stochastic(tok, par, None, dp, target_logits=logits, uniforms=u, **kw)
        assert_same(got, R.verify_tree_stochastic_reference(tok, par, tp, dp, "specinfer", u))
    tp = S.process_logits(logits, top_k=3)
    assert bool(((tp > 0).sum(-1) == 3).all())
    assert_close(tp.sum(-1), torch.ones(3, 9))
    tpp = S.process_logits(logits, top_p=0.5)
    # kept set: mass before every kept token < 0.5, and the kept mass reaches 0.5
    full = torch.softmax(logits, -1)
    assert bool((full.masked_fill(tpp == 0, 0).sum(-1) >= 0.5 - 1e-6).all())
    a = S.verify_tree_stochastic(tok, par, tp, dp, generator=torch.Generator().manual_seed(5))
    b = S.verify_tree_stochastic(tok, par, tp, dp, generator=torch.Generator().manual_seed(5))
    assert_same(a, b)


def test_stochastic_large_vocab():
    vocab = 128256
    gen = torch.Generator().manual_seed(2)
    par = torch.tensor([[-1, 0, 0, 1, 3], [-1, 0, 1, -1, 2]], dtype=torch.int32)
    tp = random_probs((2, 5, vocab), sharp=3.0, gen=gen)
    dp = random_probs((2, 5, vocab), sharp=3.0, gen=gen)
    tok = torch.multinomial(dp.view(-1, vocab), 1, generator=gen).view(2, 5)
    for rule in S.RULES:
        u = torch.rand(2, 5, generator=gen)
        assert_same(S.verify_tree_stochastic(tok, par, tp, dp, rule=rule, uniforms=u),
                    R.verify_tree_stochastic_reference(tok, par, tp, dp, rule, u))


def test_stochastic_errors():
    par = torch.tensor([[-1, 0]])
    tok = torch.zeros(1, 2, dtype=torch.long)
    p = torch.full((1, 2, 3), 1 / 3)
    with pytest.raises(ValueError, match="rule must be one of"):
        S.verify_tree_stochastic(tok, par, p, p, rule="naive")
    with pytest.raises(ValueError, match="needs draft_probs"):
        S.verify_tree_stochastic(tok, par, p, rule="rsd")
    with pytest.raises(ValueError, match="exactly one of target_probs"):
        S.verify_tree_stochastic(tok, par, p, p, target_logits=p)
    with pytest.raises(ValueError, match="uniforms must lie in"):
        S.verify_tree_stochastic(tok, par, p, p, uniforms=torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="uniforms must have shape"):
        S.verify_tree_stochastic(tok, par, p, p, uniforms=torch.rand(1, 3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        S.verify_tree_stochastic(tok, par, None, p, target_logits=p, temperature=0.0)
    with pytest.raises(ValueError, match="apply to target_logits"):
        S.verify_tree_stochastic(tok, par, p, p, top_k=2)
    with pytest.raises(ValueError, match="draft_probs must have the shape"):
        S.verify_tree_stochastic(tok, par, p, torch.full((1, 2, 4), 0.25))
    nan = p.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        S.verify_tree_stochastic(tok, par, nan, p)


# ------------------------------------------------------------------------------------------ KV compaction

def test_compact_accepted_kv_matches_reference():
    cache = torch.randn(3, 2, 14, 5)
    ai = torch.tensor([[0, 2, 5, -1], [0, 1, 3, 7], [0, -1, -1, -1]])
    for prefix in (3, torch.tensor([3, 2, 6])):
        x = cache.clone()
        lengths = S.compact_accepted_kv(x, prefix, ai)
        ref, ref_len = R.compact_accepted_kv_reference(cache, prefix, ai)
        assert torch.equal(lengths, ref_len)
        assert torch.equal(x, ref)
    with pytest.raises(ValueError, match="strictly increasing"):
        S.compact_accepted_kv(cache.clone(), 0, torch.tensor([[0, 3, 2]] * 3))
    with pytest.raises(ValueError, match="prefix of node indices"):
        S.compact_accepted_kv(cache.clone(), 0, torch.tensor([[0, -1, 2]] * 3))
    with pytest.raises(IndexError, match="cache has T=14"):
        S.compact_accepted_kv(cache.clone(), 10, ai)


def test_compact_dynamic_cache():
    from transformers import DynamicCache

    from tokprune.hf.cache import compact_dynamic_cache

    keys = [torch.randn(2, 2, 11, 4) for _ in range(3)]
    cache = DynamicCache()
    for i, k in enumerate(keys):
        cache.update(k.clone(), -k.clone(), i)
    ai = torch.tensor([[0, 2, 5], [0, 1, -1]])
    new_len = compact_dynamic_cache(cache, 4, ai)
    assert new_len == 6 and cache.get_seq_length() == 6
    for i, k in enumerate(keys):
        expected = torch.stack([torch.cat([k[b, :, :4], k[b, :, 4 + ai[b, :2]]], dim=1) for b in range(2)])
        assert torch.equal(cache.layers[i].keys, expected)
        assert torch.equal(cache.layers[i].values, -expected)
    with pytest.raises(ValueError, match="length=3"):
        compact_dynamic_cache(cache, 4, ai, length=3)


# ------------------------------------------------------------------------------------------ Triton

@needs_triton
def test_triton_greedy_equals_torch():
    gen = torch.Generator().manual_seed(31)
    for trial in range(4):
        bsz, n, vocab = 4, 12, 300 + 700 * trial  # crosses BLOCK_V=1024 chunk boundaries
        par = random_tree(bsz, n, pad=0.2, branch=2 if trial % 2 else 0, gen=gen)
        logits = torch.randn(bsz, n, vocab, generator=gen).round()  # ties across chunks
        tok = planted_tokens(par, logits)
        assert_same(S.verify_tree_greedy(*dev(tok, par, logits), backend="triton"),
                    S.verify_tree_greedy(tok, par, logits, backend="torch"), name=f"greedy#{trial}")
    # root-only trees and an all -inf row (argmax 0 in torch)
    logits = torch.full((2, 1, 5), float("-inf"))
    assert_same(S.verify_tree_greedy(*dev(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), -1), logits),
                                     backend="triton"),
                S.verify_tree_greedy(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), -1), logits))


@needs_triton
@pytest.mark.parametrize("rule", S.RULES)
def test_triton_stochastic_equals_torch(rule):
    gen = torch.Generator().manual_seed(41)
    for trial in range(3):
        bsz, n, vocab = 4, 10, 7 + 1100 * trial
        par = random_tree(bsz, n, pad=0.2, branch=2, gen=gen)
        tp = random_probs((bsz, n, vocab), zero_frac=0.3 if trial != 1 else 0.0, gen=gen)
        dp = random_probs((bsz, n, vocab), zero_frac=0.3 if trial == 1 else 0.0, gen=gen)
        # tokens drawn from the draft so that acceptances happen at large vocabularies too
        tok = torch.multinomial(dp.view(-1, vocab), 1, generator=gen).view(bsz, n)
        u = torch.rand(bsz, n, generator=gen)
        if trial == 2:
            u[:, 0] = 1.0 - 2 ** -24
        assert_same(S.verify_tree_stochastic(*dev(tok, par, tp, dp), rule=rule, uniforms=dev(u), backend="triton"),
                    S.verify_tree_stochastic(tok, par, tp, dp, rule=rule, uniforms=u, backend="torch"),
                    name=f"{rule}#{trial}")


@needs_triton
@pytest.mark.slow
def test_triton_large_vocab():
    vocab = 128256
    gen = torch.Generator().manual_seed(2)
    par = torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32)
    logits = torch.randn(1, 4, vocab, generator=gen)
    tok = planted_tokens(par, logits, frac=1.0)
    assert_same(S.verify_tree_greedy(*dev(tok, par, logits), backend="triton"), S.verify_tree_greedy(tok, par, logits))
    tp = random_probs((1, 4, vocab), sharp=3.0, gen=gen)
    dp = random_probs((1, 4, vocab), sharp=3.0, gen=gen)
    tok = torch.multinomial(dp.view(-1, vocab), 1, generator=gen).view(1, 4)
    u = torch.rand(1, 4, generator=gen)
    assert_same(S.verify_tree_stochastic(*dev(tok, par, tp, dp), rule="rsd", uniforms=dev(u), backend="triton"),
                S.verify_tree_stochastic(tok, par, tp, dp, rule="rsd", uniforms=u))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_compact_accepted_kv(dtype):
    cache = torch.randn(3, 2, 14, 70).to(dtype)
    ai = torch.tensor([[0, 2, 3, -1], [0, 1, 3, 7], [0, -1, -1, -1]])
    prefix = torch.tensor([3, 2, 6])
    x = dev(cache.clone())
    lengths = host(S.compact_accepted_kv(x, *dev(prefix, ai), backend="triton"))
    ref, ref_len = R.compact_accepted_kv_reference(cache, prefix, ai)
    assert torch.equal(lengths, ref_len) and torch.equal(host(x), ref)


@needs_triton
def test_triton_greedy_bf16_logits():
    gen = torch.Generator().manual_seed(9)
    par = random_tree(3, 11, pad=0.2, branch=2, gen=gen)
    logits = (torch.randn(3, 11, 1500, generator=gen) * 2).to(torch.bfloat16)  # bf16: many exact ties
    tok = planted_tokens(par, logits.float())
    assert_same(S.verify_tree_greedy(*dev(tok, par, logits), backend="triton"), S.verify_tree_greedy(tok, par, logits))


# ------------------------------------------------------------------------------------------ CUDA extension

@needs_backend("cuda", op="verify_tree_greedy")
def test_cuda_extension_greedy_equals_torch():
    gen = torch.Generator().manual_seed(51)
    for trial in range(4):
        bsz, n, vocab = 5, 14, 40 + 900 * trial
        par = random_tree(bsz, n, pad=0.2, branch=2 if trial % 2 else 0, gen=gen)
        logits = torch.randn(bsz, n, vocab, generator=gen).round()
        tok = planted_tokens(par, logits)
        assert_same(S.verify_tree_greedy(*dev(tok, par, logits), backend="cuda"), S.verify_tree_greedy(tok, par, logits))


@needs_backend("cuda", op="verify_tree_stochastic")
@pytest.mark.parametrize("rule", S.RULES)
def test_cuda_extension_stochastic_equals_torch(rule):
    gen = torch.Generator().manual_seed(61)
    for trial in range(4):
        bsz, n, vocab = 5, 12, 7 + 600 * trial
        par = random_tree(bsz, n, pad=0.2, branch=2, gen=gen)
        tp = random_probs((bsz, n, vocab), zero_frac=0.3 if trial % 2 else 0.0, gen=gen)
        dp = random_probs((bsz, n, vocab), zero_frac=0.3 if trial % 2 == 0 else 0.0, gen=gen)
        tok = torch.multinomial(dp.view(-1, vocab), 1, generator=gen).view(bsz, n)
        u = torch.rand(bsz, n, generator=gen)
        assert_same(S.verify_tree_stochastic(*dev(tok, par, tp, dp), rule=rule, uniforms=dev(u), backend="cuda"),
                    S.verify_tree_stochastic(tok, par, tp, dp, rule=rule, uniforms=u), name=f"{rule}#{trial}")


def test_process_logits_matches_transformers_sampling_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(8)) * 3
    for temperature, top_k, top_p in ((0.7, None, None), (1.0, 20, None), (1.2, None, 0.8), (0.9, 50, 0.6)):
        x = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k is not None:
            x = TopKLogitsWarper(top_k)(None, x)
        if top_p is not None:
            x = TopPLogitsWarper(top_p)(None, x)
        expected = torch.softmax(x, -1)
        got = S.process_logits(logits, temperature, top_k, top_p)
        assert torch.equal(got > 0, expected > 0), (temperature, top_k, top_p)
        assert_close(got, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------- data-reading checks: debug only
@pytest.fixture
def debug_off():
    from tokprune import _debug

    previous = _debug.set_debug(False)
    yield
    _debug.set_debug(previous)


def test_data_checks_run_only_in_debug_mode(debug_off):
    """Outside debug mode the ops read no tensor values to validate (no host sync on a GPU); metadata
    checks still run. Out-of-range tokens then simply never match (the torch backend stays in bounds)."""
    par = torch.tensor([[-1, 0, 0]])
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 1.0
    accept_index, accept_len, next_token = S.verify_tree_greedy(torch.tensor([[0, 9, 2]]), par, logits)
    assert accept_index.tolist() == [[0, 2]] and next_token.tolist() == [0]
    # shapes and dtypes are always checked
    with pytest.raises(ValueError, match="target_logits must have shape"):
        S.verify_tree_greedy(torch.zeros(1, 3, dtype=torch.long), par, torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="uniforms must have dtype"):
        S.verify_tree_stochastic(torch.zeros(1, 3, dtype=torch.long), par, torch.full((1, 3, 4), 0.25),
                                 torch.full((1, 3, 4), 0.25), uniforms=torch.rand(1, 3, dtype=torch.float64))
    S.verify_tree_stochastic(torch.zeros(1, 3, dtype=torch.long), par, torch.full((1, 3, 4), 0.25),
                             torch.full((1, 3, 4), 0.25), uniforms=torch.full((1, 3), 2.0))  # range not read
    from tokprune import _debug

    _debug.set_debug(True)
    with pytest.raises(IndexError, match="tokens of active nodes"):
        S.verify_tree_greedy(torch.tensor([[0, 9, 2]]), par, logits)
    with pytest.raises(ValueError, match="topological order"):
        S.verify_tree_greedy(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[-1, 0, 5]]), logits)
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\)"):
        S.verify_tree_stochastic(torch.zeros(1, 3, dtype=torch.long), par, torch.full((1, 3, 4), 0.25),
                                 torch.full((1, 3, 4), 0.25), uniforms=torch.full((1, 3), 2.0))


def test_greedy_nan_is_the_maximum_outside_debug_mode(debug_off):
    """One NaN rule: the argmax of a row with NaN is its first NaN (torch.argmax, the CUDA and the Triton
    kernels); debug mode additionally rejects it on the torch backend."""
    par = torch.tensor([[-1, 0]])
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 3] = float("nan")
    logits[0, 0, 1] = 5.0
    _, accept_len, next_token = S.verify_tree_greedy(torch.tensor([[0, 3]]), par, logits, backend="torch")
    assert accept_len.tolist() == [1]  # token 3 (the NaN) is the argmax, so the draft is accepted
    from tokprune import _debug

    _debug.set_debug(True)
    with pytest.raises(ValueError, match="NaN"):
        S.verify_tree_greedy(torch.tensor([[0, 3]]), par, logits, backend="torch")
