"""Stochastic tree verification is lossless: the emitted tokens follow the target distribution.

Set-up (V = 6): a two-level context model. The target's next-token distribution is ``P0`` at the root
and ``P1[x]`` after token ``x``; the draft's is ``q0`` / ``q1[x]``. Each row drafts a tree of depth 2
(``K`` children of the root, ``M`` children under each) with the scheme matching the rule:

* ``specinfer``: siblings i.i.d. from the draft (with replacement);
* ``rsd``: siblings by Gumbel-top-k (without replacement), in sampling order;
* ``target_only``: deterministic top-k of the draft.

The first two emitted tokens ``(e1, e2)`` are the accepted path tokens followed by the bonus token;
rows that accept nothing emit only ``e1`` and run a second verification round (a depth-1 tree rooted at
``e1``) for ``e2``. Their joint must be ``P0[e1] P1[e1, e2]``: a chi-square test over the 36 cells with
``1e5`` rows (one vectorised call per round) at ``alpha = 1e-6``. Negative controls, which must fail the
same test: no residual update, drafting without replacement verified by the with-replacement rule, and
duplicate siblings under a naive target-only rule without the update.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from tokprune.ops import spec as S

pytestmark = pytest.mark.slow

V, K, M = 6, 3, 2
ROWS = 100_000
ALPHA = 1e-6


def _model(seed: int):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.softmax(torch.randn(V, generator=g) * 0.8, -1)
    p1 = torch.softmax(torch.randn(V, V, generator=g) * 0.8, -1)
    q0 = torch.softmax(torch.randn(V, generator=g) * 1.2, -1)
    q1 = torch.softmax(torch.randn(V, V, generator=g) * 1.2, -1)
    return p0, p1, q0, q1


def _draft_children(q: torch.Tensor, k: int, scheme: str, g: torch.Generator) -> torch.Tensor:
    """``[R, k]`` sibling tokens drawn from ``q [R, V]`` with the given scheme, in sibling order."""
    if scheme == "with_replacement":
        return torch.multinomial(q, k, replacement=True, generator=g)
    if scheme == "without_replacement":  # Gumbel-top-k: sorted keys give the sequential sampling order
        gumbel = -torch.log(-torch.log(torch.rand(q.shape, generator=g).clamp_min(1e-12)))
        return torch.topk(torch.log(q) + gumbel, k, dim=-1).indices
    if scheme == "top_k":
        return torch.topk(q, k, dim=-1).indices
    if scheme == "top_k_duplicates":  # the best token twice, then the next ones
        top = torch.topk(q, k - 1, dim=-1).indices
        return torch.cat([top[:, :1], top], dim=1)
    raise ValueError(scheme)


def _tree(rows: int, k: int, m: int):
    """Parents of a regular tree: root, k children (1..k), m children under each (k+1 ...)."""
    par = [-1] + [0] * k + [1 + i // m for i in range(k * m)]
    return torch.tensor(par, dtype=torch.int32).expand(rows, -1).contiguous()


def _round(root_tok, p_root, q_root, p1, q1, depth2: bool, scheme: str, g: torch.Generator):
    """Draft one tree per row; return ``(tokens, parents, target_probs, draft_probs)``."""
    rows = root_tok.shape[0]
    kids = _draft_children(q_root, K, scheme, g)  # [R, K]
    toks = [root_tok.unsqueeze(1), kids]
    tp = [p_root.unsqueeze(1), p1[kids]]
    dp = [q_root.unsqueeze(1), q1[kids]]
    if depth2:
        grand = _draft_children(q1[kids].reshape(-1, V), M, scheme, g).view(rows, K * M)
        toks.append(grand)
        tp.append(torch.full((rows, K * M, V), 1.0 / V))  # distribution after the 2nd token: unused
        dp.append(torch.full((rows, K * M, V), 1.0 / V))
        par = _tree(rows, K, M)
    else:
        par = _tree(rows, K, 0)
    return torch.cat(toks, 1), par, torch.cat(tp, 1), torch.cat(dp, 1)


def _emitted_pairs(verify, scheme: str, seed: int, model_seed: int = 7) -> torch.Tensor:
    """``[ROWS, 2]`` first two emitted tokens using ``verify(tokens, parents, tp, dp, uniforms)``."""
    p0, p1, q0, q1 = _model(model_seed)
    g = torch.Generator().manual_seed(seed)
    root = torch.zeros(ROWS, dtype=torch.long)
    tok, par, tp, dp = _round(root, p0.expand(ROWS, V), q0.expand(ROWS, V), p1, q1, True, scheme, g)
    ai, al, nt = verify(tok, par, tp, dp, torch.rand(tok.shape, generator=g))
    path_tok = tok.gather(1, ai.clamp_min(0))
    seq = torch.where(ai >= 0, path_tok, -1)
    # emitted = path tokens after the root, then the bonus
    e1 = torch.where(al >= 1, seq[:, 1], nt)
    e2 = torch.where(al >= 2, seq[:, 2], torch.where(al == 1, nt, -1))
    # second round for rows that emitted a single token
    tok2, par2, tp2, dp2 = _round(e1, p1[e1], q1[e1], p1, q1, False, scheme, g)
    ai2, al2, nt2 = verify(tok2, par2, tp2, dp2, torch.rand(tok2.shape, generator=g))
    first2 = torch.where(al2 >= 1, tok2.gather(1, ai2[:, 1:2].clamp_min(0)).squeeze(1), nt2)
    e2 = torch.where(e2 >= 0, e2, first2)
    return torch.stack([e1, e2], 1)


def _chi2_pvalue(pairs: torch.Tensor, model_seed: int = 7) -> float:
    p0, p1, _, _ = _model(model_seed)
    expected = (p0.double().unsqueeze(1) * p1.double()).flatten() * pairs.shape[0]
    observed = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    assert float(expected.min()) > 50, "cells too small for the chi-square approximation"
    expected = expected * observed.sum() / expected.sum()
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


def _op(rule, **kw):
    def verify(tok, par, tp, dp, u):
        return S.verify_tree_stochastic(tok, par, tp, dp, rule=rule, uniforms=u, **kw)
    return verify


MATCHING = [("specinfer", "with_replacement"), ("rsd", "without_replacement"), ("target_only", "top_k"),
            ("target_only", "top_k_duplicates")]


@pytest.mark.parametrize("rule,scheme", MATCHING)
def test_verification_preserves_target_distribution(rule, scheme):
    """Every rule with its drafting scheme (plus: target-only is safe with duplicate siblings)."""
    pairs = _emitted_pairs(_op(rule), scheme, seed=1)
    pvalue = _chi2_pvalue(pairs)
    assert pvalue > ALPHA, f"{rule} with {scheme} drafts: chi-square p = {pvalue:.3g}"


def test_verification_with_logits_processing_preserves_the_processed_target():
    """temperature / top-k applied inside the op: the emitted pair follows the processed target."""
    p0, p1, q0, q1 = _model(7)
    temperature, top_k = 0.8, 4

    def verify(tok, par, tp, dp, u):
        logits = torch.log(tp) * 1.0  # the op turns these back into softmax(log p / T) restricted to top-k
        return S.verify_tree_stochastic(tok, par, None, dp, target_logits=logits, temperature=temperature,
                                        top_k=top_k, rule="specinfer", uniforms=u)

    pairs = _emitted_pairs(verify, "with_replacement", seed=3)
    proc0 = S.process_logits(torch.log(p0), temperature, top_k).double()
    proc1 = S.process_logits(torch.log(p1), temperature, top_k).double()
    expected = (proc0.unsqueeze(1) * proc1).flatten() * pairs.shape[0]
    observed = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    support = expected > 0
    assert bool((observed[~support] == 0).all()), "a token outside top-k was emitted"
    pvalue = float(stats.chisquare(observed[support].numpy(),
                                   (expected[support] * observed.sum() / expected.sum()).numpy()).pvalue)
    assert pvalue > ALPHA, f"chi-square p = {pvalue:.3g}"


# ------------------------------------------------------------------------------------------ negative controls

def _naive_verify(update: bool, rule: str):
    """A deliberately wrong verifier (vectorised over rows, loops over depth and siblings) for the
    negative controls. ``rule="specinfer"`` + ``update=False``: no residual update; ``rule="target_only"``
    + ``update=False``: accept iff ``u < p[x]`` and leave p unchanged on rejection."""
    def verify(tok, par, tp, dp, u):
        rows, n = par.shape
        children, _ = S._children(par.long())
        width = int(S.tree_depths(par).max()) + 1
        ai = torch.full((rows, width), -1, dtype=torch.long)
        ai[:, 0] = 0
        al = torch.zeros(rows, dtype=torch.long)
        nt = torch.zeros(rows, dtype=torch.long)
        alive = torch.ones(rows, dtype=torch.bool)
        cur = torch.zeros(rows, dtype=torch.long)
        r = torch.arange(rows)
        for step in range(width):
            p, q = tp[r, cur].clone(), dp[r, cur].clone()
            accepted = torch.full((rows,), -1, dtype=torch.long)
            for s in range(children.shape[-1]):
                c = children[r, cur, s]
                valid = alive & (c >= 0) & (accepted < 0)
                cc = c.clamp_min(0)
                x = tok[r, cc]
                px, qx = p[r, x], q[r, x]
                ok = (u[r, cc] < px) if rule == "target_only" else (u[r, cc] * qx < px)
                accepted = torch.where(valid & ok, c, accepted)
                if update:
                    raise NotImplementedError
            stop = alive & (accepted < 0)
            nt = torch.where(stop, S.sample_from_probs(p, u[:, 0]), nt)
            go = alive & (accepted >= 0)
            if step + 1 < width:
                ai[:, step + 1] = torch.where(go, accepted, -1)
            al += go.long()
            cur = torch.where(go, accepted, cur)
            alive = go
        return ai, al, nt
    return verify


def test_negative_control_no_residual_update_fails():
    pvalue = _chi2_pvalue(_emitted_pairs(_naive_verify(False, "specinfer"), "with_replacement", seed=1))
    assert pvalue < ALPHA, f"the test cannot detect a missing residual update (p = {pvalue:.3g})"


def test_negative_control_replacement_mismatch_fails():
    """Siblings drawn without replacement but verified by the with-replacement (SpecInfer) rule."""
    pvalue = _chi2_pvalue(_emitted_pairs(_op("specinfer"), "without_replacement", seed=1))
    assert pvalue < ALPHA, f"the test cannot detect the replacement mismatch (p = {pvalue:.3g})"


def test_negative_control_duplicate_siblings_naive_target_only_fails():
    pvalue = _chi2_pvalue(_emitted_pairs(_naive_verify(False, "target_only"), "top_k_duplicates", seed=1))
    assert pvalue < ALPHA, f"the test cannot detect duplicate siblings under a naive rule (p = {pvalue:.3g})"


# ------------------------------------------------------------------------------------- RSD-S (beam trees)

BEAM_W = 3


def _beam_pairs(verify, seed: int, model_seed: int = 7, reverse_level1: bool = False) -> torch.Tensor:
    """First two emitted tokens with RSD-S trees (``tokprune.spec.trees.beam_tree``, beam width 3,
    depth 2: the root has 3 children, the 3 depth-2 nodes are shared among them by the stochastic beam,
    so a depth-1 node has 0 to 3 children). ``reverse_level1`` reverses the order of the root's children
    (a wrong sibling order, the negative control)."""
    from tokprune.spec.trees import beam_tree

    p0, p1, q0, q1 = _model(model_seed)
    g = torch.Generator().manual_seed(seed)
    root = torch.zeros(ROWS, dtype=torch.long)

    def expand(tokens, parents, lo, hi):
        if lo == 0:
            return q0.expand(tokens.shape[0], 1, V)
        return q1[tokens[:, lo:hi]]

    tree = beam_tree(root, expand, BEAM_W, 2, generator=g)
    tok, par, dp = tree.tokens, tree.parents.long(), tree.draft_probs
    assert tree.rule == "rsd" and tok.shape == (ROWS, 1 + 2 * BEAM_W)
    kids = torch.stack([(par == i).sum(1) for i in range(1, 1 + BEAM_W)], 1)
    assert set(kids.flatten().tolist()) == {0, 1, 2, 3}, "beam trees must give varying children counts"
    if reverse_level1:
        perm = torch.tensor([0] + list(range(BEAM_W, 0, -1)) + list(range(BEAM_W + 1, 1 + 2 * BEAM_W)))
        tok, dp = tok[:, perm], dp[:, perm]
        lvl2 = par[:, BEAM_W + 1:]
        par = torch.cat([par[:, :BEAM_W + 1], torch.where(lvl2 > 0, BEAM_W + 1 - lvl2, lvl2)], 1)
    depth = torch.tensor([0] + [1] * BEAM_W + [2] * BEAM_W)
    tp = torch.where((depth == 1).view(1, -1, 1), p1[tok], torch.full((ROWS, tok.shape[1], V), 1.0 / V))
    tp[:, 0] = p0
    ai, al, nt = verify(tok, par.int(), tp, dp, torch.rand(tok.shape, generator=g))
    seq = torch.where(ai >= 0, tok.gather(1, ai.clamp_min(0)), -1)
    e1 = torch.where(al >= 1, seq[:, 1], nt)
    e2 = torch.where(al >= 2, seq[:, 2], torch.where(al == 1, nt, -1))
    tok2, par2, tp2, dp2 = _round(e1, p1[e1], q1[e1], p1, q1, False, "without_replacement", g)
    ai2, al2, nt2 = verify(tok2, par2, tp2, dp2, torch.rand(tok2.shape, generator=g))
    first2 = torch.where(al2 >= 1, tok2.gather(1, ai2[:, 1:2].clamp_min(0)).squeeze(1), nt2)
    return torch.stack([e1, torch.where(e2 >= 0, e2, first2)], 1)


def test_rsd_s_beam_trees_preserve_target_distribution():
    pvalue = _chi2_pvalue(_beam_pairs(_op("rsd"), seed=5))
    assert pvalue > ALPHA, f"RSD-S (stochastic beam) under rule rsd: chi-square p = {pvalue:.3g}"


def test_negative_control_rsd_s_wrong_sibling_order_fails():
    pvalue = _chi2_pvalue(_beam_pairs(_op("rsd"), seed=5, reverse_level1=True))
    assert pvalue < ALPHA, f"the test cannot detect a wrong sibling order in beam trees (p = {pvalue:.3g})"


def test_negative_control_rsd_s_with_replacement_rule_fails():
    pvalue = _chi2_pvalue(_beam_pairs(_op("specinfer"), seed=5))
    assert pvalue < ALPHA, f"the test cannot detect beam trees under the with-replacement rule (p = {pvalue:.3g})"
