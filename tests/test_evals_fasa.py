"""tokprune eval fasa: the Quest variant that gets the same sink / window as the other methods."""

import types

import pytest
import torch

from tokprune.evals.fasa import _policies, _quest_sink_window_class


def _oracle(scores, n_tokens, valid, budget, sink, window, ps):
    """Plain loops: sink first + window newest valid tokens, then pages best-first (pages with no free valid
    token skipped), their free valid tokens in order until ``budget`` tokens are taken."""
    batch, heads, n_pages = scores.shape
    out = []
    for b in range(batch):
        real = [t for t in range(n_tokens) if valid is None or bool(valid[b, t])]
        fixed = sorted(set(real[:sink]) | set(real[max(sink, len(real) - window):]))
        rows = []
        for h in range(heads):
            chosen = set(fixed)
            order = sorted(range(n_pages), key=lambda p: -float(scores[b, h, p]))
            room = budget - len(fixed)
            for p in order:
                free = [t for t in range(p * ps, min((p + 1) * ps, n_tokens)) if t in real and t not in fixed]
                if not free or scores[b, h, p] == float("-inf"):
                    continue
                if room <= 0:
                    break
                take = free[:room]
                chosen |= set(take)
                room -= len(take)
            rows.append(sorted(chosen))
        out.append(rows)
    return out


@pytest.mark.parametrize("n_tokens,budget,sink,window,padded", [
    (200, 64, 4, 16, False), (201, 64, 4, 16, True), (300, 128, 4, 32, False), (97, 40, 2, 10, True),
    (130, 64, 0, 20, False)])
def test_quest_sink_window_matches_oracle(n_tokens, budget, sink, window, padded):
    torch.manual_seed(n_tokens)
    ps, batch, heads = 16, 2, 3
    cls = _quest_sink_window_class()
    policy = cls(budget=budget, sink=sink, window=window, page_size=ps, decline_ratio=0)
    n_pages = -(-n_tokens // ps)
    scores = torch.randn(batch, heads, n_pages)
    valid = None
    if padded:
        valid = torch.ones(batch, n_tokens, dtype=torch.bool)
        valid[1, :37] = False  # left padding of row 1
    ctx = types.SimpleNamespace(n_tokens=n_tokens, valid=valid)
    got = policy.select(scores, ctx)
    expected = _oracle(scores, n_tokens, valid, budget, sink, window, ps)
    for b in range(batch):
        for h in range(heads):
            row = got[b, h]
            kept = row[row >= 0].tolist()
            assert len(kept) == len(set(kept)), "a token is attended twice"
            assert sorted(kept) == expected[b][h]
            assert len(kept) <= budget


def test_quest_without_sink_window_is_quest():
    from tokprune.methods import Quest

    torch.manual_seed(0)
    scores = torch.randn(1, 3, 13)
    ctx = types.SimpleNamespace(n_tokens=200, valid=None)
    q = Quest(budget=64, sink=0, window=0, page_size=16, decline_ratio=0)
    qsw = _quest_sink_window_class()(budget=64, sink=0, window=0, page_size=16, decline_ratio=0)
    assert torch.equal(q.select(scores, ctx), qsw.select(scores, ctx))


def test_every_method_gets_the_same_sink_and_window():
    for name in ("fasa", "quest", "snapkv", "streaming"):
        policy = _policies(name, 128, "uncalibrated", 8, {}, sink=4, window=-1)
        assert (policy.sink, policy.window) == (4, 32), name
