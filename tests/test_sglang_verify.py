"""tokprune.integrations.sglang against a plain-Python transcription of SGLang's tree verifiers.

The two ``*_transcription`` functions restate, statement by statement, what SGLang's CUDA kernels
``VerifyTreeGreedy`` and ``TreeSpeculativeSamplingTargetOnly`` do for one request (one thread block
each), written here in our own words with Python scalars; the vectorised implementation must write the
same values into the same in-place outputs, and leave everything else untouched.
"""

import random

import pytest
import torch

from tokprune.integrations.sglang import tree_speculative_sampling_target_only, verify_tree_greedy
from tokprune.ops import tree_to_links
from tokprune.ops import verify_tree_greedy as tokprune_verify_greedy

SENTINEL = -7


# ----------------------------------------------------------------------------------------------------
# transcriptions
# ----------------------------------------------------------------------------------------------------

def greedy_transcription(predicts, accept_index, accept_token_num, candidates, retrive_index,
                         next_token, next_sibling, target_predict):
    """Lists in, lists modified in place (``predicts`` flat, the others nested per request)."""
    n_steps = len(accept_index[0]) if accept_index else 0
    flat_target = [t for row in target_predict for t in row]
    for b in range(len(candidates)):
        last = retrive_index[b][0]  # the root's global index
        accept_index[b][0] = last
        accepted = 0
        cur = 0
        for _ in range(1, n_steps):
            cur = next_token[b][cur]  # first child of the node accepted last
            while cur != -1:
                global_idx = retrive_index[b][cur]
                wanted = flat_target[last]  # the target's choice after the last accepted node
                if candidates[b][cur] == wanted:
                    predicts[last] = wanted
                    accepted += 1
                    accept_index[b][accepted] = global_idx
                    last = global_idx
                    break
                cur = next_sibling[b][cur]
            if cur == -1:  # no child matched: stop descending
                break
        accept_token_num[b] = accepted
        predicts[last] = flat_target[last]  # bonus token


def target_only_transcription(predicts, accept_index, accept_token_num, candidates, retrive_index, next_token,
                              next_sibling, uniform, uniform_final, target_probs, threshold_single, threshold_acc,
                              draft_probs):
    """Tensors for the probabilities (float32 arithmetic as in the kernel), lists for the tree."""
    n_steps = len(accept_index[0]) if accept_index else 0
    vocab = target_probs.shape[2]
    thr_single = torch.tensor(threshold_single, dtype=torch.float32)
    thr_acc = torch.tensor(max(threshold_acc, 1e-9), dtype=torch.float32)
    for b in range(len(candidates)):
        acc = torch.tensor(0.0, dtype=torch.float32)
        row = 0  # local node whose target row is in use
        coin = uniform[b, 0]
        last = retrive_index[b][0]
        accept_index[b][0] = last
        accepted = 0
        cur = 0
        for _ in range(1, n_steps):
            cur = next_token[b][cur]
            while cur != -1:
                global_idx = retrive_index[b][cur]
                token = candidates[b][cur]
                p = target_probs[b, row, token]
                acc = acc + p
                if bool(coin <= acc / thr_acc) or bool(p >= thr_single):
                    acc = torch.tensor(0.0, dtype=torch.float32)
                    row = cur
                    coin = uniform[b, cur]
                    predicts[last] = token
                    accepted += 1
                    accept_index[b][accepted] = global_idx
                    last = global_idx
                    break
                draft_probs[b, row, token] = target_probs[b, row, token]
                cur = next_sibling[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        q = target_probs[b, row]
        d = draft_probs[b, row] if accepted != n_steps - 1 else torch.zeros_like(q)
        residual = (q - d).clamp_min(0.0)
        u = uniform_final[b] * residual.sum()
        cdf = torch.cumsum(residual, dim=0)
        sampled = vocab - 1
        for v in range(vocab):
            if bool(cdf[v] > u):
                sampled = v
                break
        predicts[last] = sampled


# ----------------------------------------------------------------------------------------------------
# random trees in SGLang's format
# ----------------------------------------------------------------------------------------------------

def random_parents(rng, n):
    parents = [-1]
    for i in range(1, n):
        parents.append(rng.randrange(i) if rng.random() > 0.1 or i < 2 else -1)  # a few padding nodes
    # padding nodes cannot have children: re-hang those under the root
    for i in range(1, n):
        if parents[i] >= 0 and parents[parents[i]] == -1 and parents[i] != 0:
            parents[i] = 0
    return parents


def links(rng, parents, shuffle):
    """first child / next sibling; siblings in increasing order (SGLang's builder) or shuffled."""
    n = len(parents)
    first, sibling = [-1] * n, [-1] * n
    kids = {}
    for i in range(1, n):
        if parents[i] >= 0:
            kids.setdefault(parents[i], []).append(i)
    for p, ks in kids.items():
        if shuffle:
            rng.shuffle(ks)
        first[p] = ks[0]
        for a, c in zip(ks, ks[1:]):
            sibling[a] = c
    return first, sibling


def random_batch(rng, shuffle_siblings, permute_global):
    bsz, n, vocab = rng.randint(1, 4), rng.randint(1, 12), rng.randint(2, 6)
    steps = rng.randint(1, 7)
    trees = [random_parents(rng, n) for _ in range(bsz)]
    first, sibling = zip(*(links(rng, p, shuffle_siblings) for p in trees))
    candidates = [[rng.randrange(vocab) for _ in range(n)] for _ in range(bsz)]
    order = list(range(bsz * n))
    if permute_global:
        rng.shuffle(order)
    retrive_index = [order[b * n:(b + 1) * n] for b in range(bsz)]
    return bsz, n, vocab, steps, trees, [list(f) for f in first], [list(s) for s in sibling], candidates, retrive_index


def as_tensors(first, sibling, candidates, retrive_index):
    t = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    return t(candidates), t(retrive_index), t(first), t(sibling)


def fresh_outputs(bsz, n, steps):
    return ([SENTINEL] * (bsz * n), [[-1] * steps for _ in range(bsz)], [99] * bsz)


def as_outputs(predicts, accept_index, accept_token_num):
    return (torch.tensor(predicts, dtype=torch.int32), torch.tensor(accept_index, dtype=torch.int32),
            torch.tensor(accept_token_num, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------------
# greedy
# ----------------------------------------------------------------------------------------------------

def test_verify_tree_greedy_matches_transcription_on_200_random_batches():
    rng = random.Random(0)
    accepted_total = 0
    for it in range(200):
        bsz, n, vocab, steps, _, first, sibling, candidates, retrive_index = random_batch(rng, it % 2 == 1, it % 4 == 3)
        # the target agrees with some child often, so that paths of several tokens are accepted
        target = [[rng.randrange(vocab) for _ in range(n)] for _ in range(bsz)]
        flat_target = [0] * (bsz * n)
        for b in range(bsz):
            for i in range(n):
                kid = first[b][i]
                if kid >= 0 and rng.random() < 0.7:
                    target[b][i] = candidates[b][kid]
        for b in range(bsz):  # target_predict is read through the global index
            for i in range(n):
                flat_target[retrive_index[b][i]] = target[b][i]
        target_predict = [flat_target[b * n:(b + 1) * n] for b in range(bsz)]
        expected = fresh_outputs(bsz, n, steps)
        greedy_transcription(*expected, candidates, retrive_index, first, sibling, target_predict)
        outs = as_outputs(*fresh_outputs(bsz, n, steps))
        result = verify_tree_greedy(*outs, *as_tensors(first, sibling, candidates, retrive_index),
                                    torch.tensor(target_predict, dtype=torch.int64))
        assert result is None
        for name, got, want in zip(("predicts", "accept_index", "accept_token_num"), outs, as_outputs(*expected)):
            assert torch.equal(got, want), f"batch {it}: {name} {got.tolist()} != {want.tolist()}"
        accepted_total += int(outs[2].sum())
    assert accepted_total > 100  # the batches exercised real acceptance paths


def test_verify_tree_greedy_agrees_with_tokprune_op():
    """On canonical trees (siblings in increasing order, global index = b * N + i) and S large enough
    never to truncate, SGLang's entry and tokprune.ops.verify_tree_greedy take the same decisions."""
    rng = random.Random(1)
    for _ in range(50):
        bsz, n, vocab = rng.randint(1, 4), rng.randint(1, 10), rng.randint(2, 5)
        parents = torch.tensor([random_parents(rng, n) for _ in range(bsz)], dtype=torch.int64)
        first, sibling = tree_to_links(parents)
        tokens = torch.randint(0, vocab, (bsz, n))
        logits = torch.randn(bsz, n, vocab)
        target = logits.argmax(-1)
        idx, acc_len, bonus = tokprune_verify_greedy(tokens, parents, logits)
        steps = n + 1
        predicts, accept_index, accept_num = as_outputs(*fresh_outputs(bsz, n, steps))
        retrive_index = torch.arange(bsz * n).view(bsz, n)
        verify_tree_greedy(predicts, accept_index, accept_num, tokens, retrive_index, first, sibling, target)
        assert torch.equal(accept_num.long(), acc_len)
        width = idx.shape[1]
        local = torch.where(idx >= 0, idx + retrive_index[:, :1], -1)
        assert torch.equal(accept_index[:, :width].long(), local)
        last = accept_index.long().gather(1, acc_len[:, None]).squeeze(1)
        assert torch.equal(predicts.long()[last], bonus)


def test_verify_tree_greedy_rejects_bad_input():
    cand = torch.zeros(2, 3, dtype=torch.int64)
    ri = torch.arange(6).view(2, 3)
    nt = torch.tensor([[1, -1, -1], [2, -1, -1]])
    ns = torch.full((2, 3), -1)
    tp = torch.zeros(2, 3, dtype=torch.int64)
    pred, ai = torch.zeros(6, dtype=torch.int32), torch.full((2, 3), -1, dtype=torch.int32)
    an = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="predicts must have dtype in \\(int32\\)"):
        verify_tree_greedy(pred.long(), ai, an, cand, ri, nt, ns, tp)
    with pytest.raises(TypeError, match="target_predict must have dtype in \\(int64\\)"):
        verify_tree_greedy(pred, ai, an, cand, ri, nt, ns, tp.int())
    with pytest.raises(ValueError, match="retrive_next_sibling must have the shape of candidates"):
        verify_tree_greedy(pred, ai, an, cand, ri, nt, ns[:, :2], tp)
    with pytest.raises(ValueError, match="accept_index must be \\(B=2, num_spec_step >= 1\\)"):
        verify_tree_greedy(pred, ai[:, :0], an, cand, ri, nt, ns, tp)
    with pytest.raises(IndexError, match="retrive_next_token values must be -1 or local node indices in \\[0, N=3\\)"):
        verify_tree_greedy(pred, ai, an, cand, ri, torch.tensor([[3, -1, -1], [1, -1, -1]]), ns, tp)
    with pytest.raises(IndexError, match="retrive_index values must be global indices in \\[0, "
                                         "predicts.numel\\(\\)=6\\)"):
        verify_tree_greedy(pred, ai, an, cand, ri + 1, nt, ns, tp)
    with pytest.raises(ValueError, match="retrive_next_sibling has a cycle"):
        verify_tree_greedy(pred, ai, an, cand, ri, torch.tensor([[1, -1, -1], [-1, -1, -1]]),
                           torch.tensor([[-1, 2, 1], [-1, -1, -1]]), torch.ones(2, 3, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------
# target-only sampling
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_draft_buffer", [False, True])
def test_target_only_sampling_matches_transcription_on_200_random_batches(with_draft_buffer):
    rng = random.Random(2)
    gen = torch.Generator().manual_seed(2)
    accepted_total = 0
    for it in range(200):
        bsz, n, vocab, steps, _, first, sibling, candidates, retrive_index = random_batch(rng, it % 2 == 1, it % 4 == 3)
        probs = torch.softmax(2 * torch.randn(bsz, n, vocab, generator=gen), dim=-1)
        uniform = torch.rand(bsz, n, generator=gen)
        uniform_final = torch.rand(bsz, generator=gen)
        thr_single, thr_acc = (1.0, 1.0) if it % 3 else (rng.random(), rng.random())
        expected = fresh_outputs(bsz, n, steps)
        # a caller's buffer may hold stale values: SGLang reads them at the last node unless S - 1 were accepted
        initial = 0.1 * torch.rand(bsz, n, vocab, generator=gen) if with_draft_buffer else torch.zeros_like(probs)
        draft_expected = initial.clone()
        target_only_transcription(*expected, candidates, retrive_index, first, sibling, uniform, uniform_final, probs,
                                  thr_single, thr_acc, draft_expected)
        outs = as_outputs(*fresh_outputs(bsz, n, steps))
        draft = initial.clone() if with_draft_buffer else None
        tree_speculative_sampling_target_only(*outs, *as_tensors(first, sibling, candidates, retrive_index),
                                              uniform, uniform_final, probs, thr_single, thr_acc,
                                              draft_probs=draft)
        for name, got, want in zip(("predicts", "accept_index", "accept_token_num"), outs, as_outputs(*expected)):
            assert torch.equal(got, want), f"batch {it}: {name} {got.tolist()} != {want.tolist()}"
        if with_draft_buffer:
            assert torch.equal(draft, draft_expected)
        accepted_total += int(outs[2].sum())
    assert accepted_total > 100


def test_target_only_sampling_rejects_bad_input():
    cand = torch.zeros(1, 2, dtype=torch.int64)
    ri = torch.arange(2).view(1, 2)
    nt = torch.tensor([[1, -1]])
    ns = torch.full((1, 2), -1)
    u = torch.rand(1, 2)
    uf = torch.rand(1)
    probs = torch.full((1, 2, 3), 1 / 3)
    outs = (torch.zeros(2, dtype=torch.int32), torch.full((1, 2), -1, dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="threshold_acc must be a float in \\[0, 1\\]"):
        tree_speculative_sampling_target_only(*outs, cand, ri, nt, ns, u, uf, probs, 1.0, 1.5)
    with pytest.raises(TypeError, match="target_probs must have dtype in \\(float32\\)"):
        tree_speculative_sampling_target_only(*outs, cand, ri, nt, ns, u, uf, probs.double())
    with pytest.raises(ValueError, match="uniform_samples must have the shape of candidates"):
        tree_speculative_sampling_target_only(*outs, cand, ri, nt, ns, u[:, :1], uf, probs)
    with pytest.raises(IndexError, match="candidates must be token ids in \\[0, V=3\\)"):
        tree_speculative_sampling_target_only(*outs, cand + 3, ri, nt, ns, u, uf, probs)
    with pytest.raises(ValueError, match="target_probs must be \\(B, N\\) = \\(1, 2\\) \\+ \\(V,\\)"):
        tree_speculative_sampling_target_only(*outs, cand, ri, nt, ns, u, uf, probs[:, :1])


def test_target_only_acceptance_is_inclusive_at_the_coin():
    """``coin <= acc``: a coin exactly equal to the accumulated probability accepts (exact binary values)."""
    cand = torch.tensor([[0, 1, 2]])
    ri = torch.arange(3).view(1, 3)
    nt = torch.tensor([[1, -1, -1]])
    ns = torch.tensor([[-1, 2, -1]])  # root's children: node 1 (token 1), then node 2 (token 2)
    probs = torch.tensor([[[0.25, 0.25, 0.5], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]])
    for coin, accepted_node in ((0.25, 1), (0.75, 2), (0.875, None)):
        outs = (torch.full((3,), SENTINEL, dtype=torch.int32), torch.full((1, 2), -1, dtype=torch.int32),
                torch.zeros(1, dtype=torch.int32))
        tree_speculative_sampling_target_only(*outs, cand, ri, nt, ns, torch.tensor([[coin, 0.0, 0.0]]),
                                              torch.tensor([0.5]), probs)
        if accepted_node is None:  # both rejected: the bonus comes from the root row minus tokens 1 and 2
            assert outs[2].item() == 0 and outs[0][0].item() == 0
        else:
            assert outs[1].tolist() == [[0, accepted_node]] and outs[0][0].item() == accepted_node
