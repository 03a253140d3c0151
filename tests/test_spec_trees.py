"""Draft-tree builders of tokprune.spec.trees: invariants, greedy order, sampling laws, Token Recycling."""

from __future__ import annotations

import heapq
import math

import pytest
import torch

from tokprune.reference.spec import ancestor_matrix_reference, tree_depths_reference
from tokprune.ops import spec as S
from tokprune.spec.trees import (RecyclingTemplate, ancestor_matrix, beam_tree, dyspec_tree, init_adjacency,
                                 named_template, paper_template, recycling_template, sampled_tree, token_recycling_tree,
                                 tree_depths, update_adjacency)

V = 12


def markov_expand(table: torch.Tensor, calls=None):
    """Draft whose distribution at a node depends only on the node's token: ``table [V, V]``."""

    def expand(tokens, parents, lo, hi):
        if calls is not None:
            calls.append((lo, hi))
        return table[tokens[:, lo:hi]]

    return expand


def random_table(seed=0, vocab=V, temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(vocab, vocab, generator=g) * 2 / temp, -1)


def check_canonical(parents: torch.Tensor, tokens: torch.Tensor):
    assert parents.dtype == torch.int32 and tokens.dtype == torch.int64
    assert bool((parents[:, 0] == -1).all())
    n = parents.shape[1]
    node = torch.arange(n)
    assert bool(((parents[:, 1:] >= -1) & (parents[:, 1:] < node[1:])).all())
    active = (parents >= 0) | (node == 0)
    # padding nodes have no children
    par_active = active.gather(1, parents.long().clamp_min(0))
    assert bool((par_active | (parents < 0)).all())


def reference_dyspec(root: int, table: torch.Tensor, budget: int, max_children: int):
    """Python heap: pop the candidate of highest cumulative probability, push its top children."""
    heap, nodes = [], [(-1, root, 1.0)]

    def push(i):
        q = table[nodes[i][1]]
        top = torch.sort(q, descending=True, stable=True).indices[:max_children]
        for t in top.tolist():
            heapq.heappush(heap, (-(nodes[i][2] * float(q[t])), i, t))

    push(0)
    while len(nodes) < budget:
        negp, par, tok = heapq.heappop(heap)
        nodes.append((par, tok, -negp))
        push(len(nodes) - 1)
    return nodes


@pytest.mark.parametrize("budget,max_children", [(1, 3), (2, 3), (9, 3), (17, 4), (25, 12)])
def test_dyspec_matches_heap_reference(budget, max_children):
    table = random_table(1)
    roots = torch.tensor([0, 5, 11])
    calls = []
    tree = dyspec_tree(roots, markov_expand(table, calls), budget, max_children=max_children, width=1)
    assert tree.tokens.shape == (3, budget) and tree.rule == "target_only" and tree.draft_probs is None
    check_canonical(tree.parents, tree.tokens)
    # expand is called on contiguous increasing ranges: (0,1), (1,2), ...
    assert calls == [(i, i + 1) for i in range(budget - 1)]
    for b, r in enumerate(roots.tolist()):
        ref = reference_dyspec(r, table, budget, max_children)
        assert tree.parents[b].tolist() == [p for p, _, _ in ref]
        assert tree.tokens[b].tolist() == [t for _, t, _ in ref]
        cum = [c for _, _, c in ref]
        # greedy by cumulative probability: non-increasing in node order
        assert all(cum[i] >= cum[i + 1] - 1e-7 for i in range(1, len(cum) - 1))


def test_dyspec_width_and_zero_probability_padding():
    table = torch.zeros(V, V)
    table[:, 3], table[:, 7] = 0.75, 0.25  # support of size 2
    tree = dyspec_tree(torch.tensor([1, 2]), markov_expand(table), 11, max_children=4, width=3)
    check_canonical(tree.parents, tree.tokens)
    assert tree.tokens.shape == (2, 11)
    active = tree.active()
    assert active.sum(1).tolist() == [10, 10]  # only slot 3 is padding (see below)
    assert bool(torch.isin(tree.tokens[:, 1:][active[:, 1:]], torch.tensor([3, 7])).all())
    # round 1 draws from the root's children only: 3 (0.75), 7 (0.25), and a zero-probability
    # candidate, which becomes a padding slot
    assert tree.tokens[0, 1:3].tolist() == [3, 7] and int(tree.parents[0, 3]) == -1
    # round 2 expands 3 and 7: best candidates 3->3 (0.5625), 3->7 and 7->3 (0.1875 each)
    assert tree.tokens[0, 4:7].tolist() == [3, 7, 3] and tree.parents[0, 4:7].tolist() == [1, 1, 2]


def test_dyspec_single_token_support_gives_padding():
    table = torch.zeros(V, V)
    table[:, 5] = 1.0
    tree = dyspec_tree(torch.tensor([0]), markov_expand(table), 7, max_children=3, width=3)
    check_canonical(tree.parents, tree.tokens)
    # each round has one finite candidate: a chain 0 -> 1 -> 4, the other slots are padding
    assert tree.parents[0].tolist() == [-1, 0, -1, -1, 1, -1, -1]
    assert tree.tokens[0, [1, 4]].tolist() == [5, 5]


def test_dyspec_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        dyspec_tree(torch.tensor([0]), markov_expand(random_table()), 0)
    with pytest.raises(ValueError, match="root"):
        dyspec_tree(torch.tensor([[0]]), markov_expand(random_table()), 3)


@pytest.mark.parametrize("mode,rule", [("gumbel", "rsd"), ("replace", "specinfer"), ("topk", "target_only")])
def test_sampled_tree_shape_and_rule(mode, rule):
    table = random_table(2)
    g = torch.Generator().manual_seed(3)
    tree = sampled_tree(torch.tensor([4, 9]), markov_expand(table), (3, 2, 1), mode=mode, generator=g)
    n = 1 + 3 + 6 + 6
    assert tree.tokens.shape == (2, n) and tree.rule == rule
    check_canonical(tree.parents, tree.tokens)
    assert tree.draft_probs.shape == (2, n, V)
    # draft_probs at expanded nodes = the draft distribution of their token; uniform on leaves
    torch.testing.assert_close(tree.draft_probs[:, :10], table[tree.tokens[:, :10]])
    torch.testing.assert_close(tree.draft_probs[:, 10:], torch.full((2, 6, V), 1.0 / V))
    depth = tree_depths(tree.parents)
    assert depth[0].tolist() == [0] + [1] * 3 + [2] * 6 + [3] * 6
    for b in range(2):
        for parent in range(10):
            kids = [i for i in range(n) if int(tree.parents[b, i]) == parent]
            assert len(kids) == (3, 2, 2, 2, 1, 1, 1, 1, 1, 1)[parent]
            toks = tree.tokens[b, kids].tolist()
            if mode != "replace":
                assert len(set(toks)) == len(toks), "siblings drawn without replacement must be distinct"
            if mode == "topk":
                q = table[tree.tokens[b, parent]]
                assert toks == torch.sort(q, descending=True, stable=True).indices[:len(kids)].tolist()
    # reproducible with the same generator seed
    again = sampled_tree(torch.tensor([4, 9]), markov_expand(table), (3, 2, 1), mode=mode,
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.tokens, tree.tokens)


def test_gumbel_top_k_follows_sampling_without_replacement():
    """First sibling ~ q; second sibling ~ sum_i q_i q_j / (1 - q_i) (j != i)."""
    q = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40000
    expand = lambda tokens, parents, lo, hi: q.expand(tokens.shape[0], hi - lo, 4)  # noqa: E731
    tree = sampled_tree(torch.zeros(n, dtype=torch.long), expand, (2,), mode="gumbel",
                        generator=torch.Generator().manual_seed(0))
    first = torch.bincount(tree.tokens[:, 1], minlength=4).double() / n
    second = torch.bincount(tree.tokens[:, 2], minlength=4).double() / n
    expect2 = torch.tensor([sum(q[i] * q[j] / (1 - q[i]) for i in range(4) if i != j) for j in range(4)]).double()
    tol = 4 * torch.sqrt(q.double() * (1 - q.double()) / n) + 1e-3
    assert bool(((first - q.double()).abs() < tol).all()), (first, q)
    assert bool(((second - expect2).abs() < 4 * torch.sqrt(expect2 * (1 - expect2) / n) + 1e-3).all()), (second, expect2)
    assert bool((tree.tokens[:, 1] != tree.tokens[:, 2]).all())


def test_gumbel_never_draws_zero_probability_tokens():
    q = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0])
    expand = lambda tokens, parents, lo, hi: q.expand(tokens.shape[0], hi - lo, 5)  # noqa: E731
    tree = sampled_tree(torch.zeros(64, dtype=torch.long), expand, (4, 2), mode="gumbel",
                        generator=torch.Generator().manual_seed(1))
    check_canonical(tree.parents, tree.tokens)
    active = tree.active()
    assert bool(torch.isin(tree.tokens[:, 1:][active[:, 1:]], torch.tensor([1, 3])).all())
    assert int(active[:, 1:5].sum(1).max()) == 2  # only two tokens have mass: 2 of the 4 root slots are padding
    assert int(active.sum(1).min()) == 1 + 2 + 4


def test_replacement_sampling_frequencies():
    q = torch.tensor([0.7, 0.2, 0.1])
    n = 20000
    expand = lambda tokens, parents, lo, hi: q.expand(tokens.shape[0], hi - lo, 3)  # noqa: E731
    tree = sampled_tree(torch.zeros(n, dtype=torch.long), expand, (3,), mode="replace",
                        generator=torch.Generator().manual_seed(2))
    freq = torch.bincount(tree.tokens[:, 1:].flatten(), minlength=3).double() / (3 * n)
    assert bool(((freq - q.double()).abs() < 0.01).all())
    dup = (tree.tokens[:, 1] == tree.tokens[:, 2]).double().mean()
    assert abs(float(dup) - float((q ** 2).sum())) < 0.02  # duplicates occur at the i.i.d. rate


def test_tree_depths_and_ancestors_match_reference():
    parents = torch.tensor([[-1, 0, 0, 1, 3, -1, 2], [-1, 0, 1, 2, 3, 4, 5]], dtype=torch.int32)
    ref_depth = tree_depths_reference(parents)
    # one convention: tokprune.spec.tree_depths IS tokprune.ops.tree_depths (padding nodes -1)
    assert tree_depths is S.tree_depths
    assert torch.equal(tree_depths(parents), ref_depth) and int(tree_depths(parents)[0, 5]) == -1
    assert torch.equal(ancestor_matrix(parents), ancestor_matrix_reference(parents))
    with pytest.raises(ValueError, match="parents"):
        ancestor_matrix(torch.tensor([[-1, 1]]))


@pytest.mark.parametrize("budget,k,max_depth", [(1, 4, 8), (24, 8, 8), (40, 4, 3), (80, 8, 6)])
def test_recycling_template_invariants(budget, k, max_depth):
    t = recycling_template(budget, k, max_depth=max_depth)
    par, rank = t.parents.tolist(), t.ranks.tolist()
    assert len(par) == budget and par[0] == -1
    depth = [0] * budget
    for i in range(1, budget):
        assert 0 <= par[i] < i and 0 <= rank[i] < k
        depth[i] = depth[par[i]] + 1
        assert depth[i] <= max_depth
    for node in range(budget):
        kid_ranks = [rank[i] for i in range(1, budget) if par[i] == node]
        assert kid_ranks == list(range(len(kid_ranks))), "children take ranks 0, 1, ... in node order"
    assert sum(len(lv) for lv in t.levels) == budget


def test_token_recycling_tree_fills_template_from_adjacency():
    g = torch.Generator().manual_seed(0)
    vocab, k = 30, 4
    adj = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(vocab)])
    template = recycling_template(20, k, max_depth=5)
    root = torch.tensor([3, 17, 29])
    tree = token_recycling_tree(root, adj, template)
    check_canonical(tree.parents, tree.tokens)
    assert tree.rule == "target_only" and tree.draft_probs is None
    for b in range(3):
        for i in range(1, 20):
            p, r = int(template.parents[i]), int(template.ranks[i])
            assert int(tree.tokens[b, i]) == int(adj[tree.tokens[b, p], r])
        assert int(tree.tokens[b, 0]) == int(root[b])
    with pytest.raises(ValueError, match="rank"):
        token_recycling_tree(root, adj[:, :2], template)
    with pytest.raises(ValueError, match="parents"):
        RecyclingTemplate.from_parents_ranks([-1, 1], [-1, 0])


def test_update_adjacency_writes_target_top_k():
    vocab, k = 10, 3
    adj = init_adjacency(vocab, k)
    assert adj[5].tolist() == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([[4, 7, 4], [2, 9, 1]])
    logits = torch.randn(2, 3, vocab, generator=g)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    before = adj.clone()
    update_adjacency(adj, tokens, logits, mask=mask)
    top = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :k]
    assert adj[7].tolist() == top[0, 1].tolist()
    assert adj[4].tolist() == top[0, 2].tolist()  # token 4 seen twice: the last occurrence wins
    assert adj[2].tolist() == top[1, 0].tolist() and adj[1].tolist() == top[1, 2].tolist()
    untouched = torch.ones(vocab, dtype=torch.bool)
    untouched[[7, 4, 2, 1]] = False
    assert torch.equal(adj[untouched], before[untouched])  # 9 was masked out
    with pytest.raises(ValueError, match="logits"):
        update_adjacency(adj, tokens, logits[:, :2])


def test_paper_template_shape():
    """Token Recycling's "2.2.2" template: 80 nodes + root, depth 6, level widths 8/21/25/15/8/3."""
    t = paper_template()
    assert t.num_nodes == 81
    assert [len(lv) for lv in t.levels] == [1, 8, 21, 25, 15, 8, 3]
    par, rank = t.parents.tolist(), t.ranks.tolist()
    assert par[0] == -1 and rank[0] == -1
    depth = [0] * 81
    for i in range(1, 81):
        assert 0 <= par[i] < i and 0 <= rank[i] < 8
        depth[i] = depth[par[i]] + 1
    assert max(depth) == 6 and depth == sorted(depth), "breadth-first order"
    for node in range(81):  # children of a node take ranks 0, 1, ... in node order
        kid_ranks = [rank[i] for i in range(1, 81) if par[i] == node]
        assert kid_ranks == list(range(len(kid_ranks)))
    paths = t.paths()
    assert len(set(paths)) == 81 and paths[0] == () and paths[1:9] == [(r,) for r in range(8)]
    for lv in t.levels:  # within a level, lexicographic rank paths (the authors' listing order)
        lp = [paths[i] for i in lv.tolist()]
        assert lp == sorted(lp)
    assert (0, 0, 0, 0, 0, 0) in paths and (0, 0, 0, 1, 0, 0) in paths and (7, 0) in paths
    assert named_template("paper").paths() == paths and named_template("paper-2.2.2").num_nodes == 81
    with pytest.raises(ValueError, match="template name"):
        named_template("2.2.3")
    # from_paths round trip and errors
    assert RecyclingTemplate.from_paths(paths[1:]).paths() == paths
    with pytest.raises(ValueError, match="parent path"):
        RecyclingTemplate.from_paths([(0,), (1, 0, 0)])
    # expected accepted length: sum over nodes of the product of rank probabilities along the path
    probs = [0.5 ** (r + 1) for r in range(8)]
    brute = sum(math.prod(probs[r] for r in p) for p in paths[1:])
    assert abs(t.expected_accepted(probs) - brute) < 1e-12


def test_beam_tree_structure_and_sbs_order():
    """RSD-S trees: 1 + W*D nodes, W nodes per level, siblings in decreasing perturbed value, the
    children of the root are a Gumbel-top-W draw (without replacement) from q at the root."""
    table = random_table(3)
    root = torch.arange(8) % V
    g = torch.Generator().manual_seed(0)
    tree = beam_tree(root, markov_expand(table), 3, 4, generator=g)
    check_canonical(tree.parents, tree.tokens)
    assert tree.rule == "rsd" and tree.tokens.shape == (8, 13) and tree.draft_probs.shape == (8, 13, V)
    depth = S.tree_depths(tree.parents)
    assert torch.equal(depth, torch.tensor([0] + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3).expand(8, -1))
    for b in range(8):
        toks, par = tree.tokens[b].tolist(), tree.parents[b].tolist()
        for node in range(13):
            kids = [toks[i] for i in range(13) if par[i] == node]
            assert len(set(kids)) == len(kids), "siblings are distinct (without replacement)"
        assert torch.allclose(tree.draft_probs[b, 1:4], table[tree.tokens[b, 1:4]])
    # the root's first child follows q(root) (Gumbel-max), the first 2 children are ordered draws
    n = 20000
    root = torch.zeros(n, dtype=torch.long)
    tree = beam_tree(root, markov_expand(table), 2, 1, generator=torch.Generator().manual_seed(1))
    q = table[0].double()
    first = torch.bincount(tree.tokens[:, 1], minlength=V).double() / n
    assert float((first - q).abs().max()) < 0.015
    second = torch.bincount(tree.tokens[:, 2], minlength=V).double() / n
    expect2 = sum(q[a] * q / (1 - q[a]) * (torch.arange(V) != a) for a in range(V))
    assert float((second - expect2).abs().max()) < 0.015
    with pytest.raises(ValueError, match="beam_width"):
        beam_tree(root[:2], markov_expand(table), 0, 2)


def test_beam_tree_padding_when_support_is_small():
    table = torch.zeros(V, V)
    table[:, 1] = 1.0  # every node has a single possible child
    tree = beam_tree(torch.tensor([0, 5]), markov_expand(table), 3, 2)
    check_canonical(tree.parents, tree.tokens)
    act = tree.active()
    assert act.sum(1).tolist() == [3, 3]  # root + one child per level; the other slots are padding
