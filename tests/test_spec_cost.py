"""tokprune.spec.cost: the tree-size choice on synthetic cost tables (against a brute-force argmax), the
cached measurement (one measurement per key, a JSON file in the user cache dir), and the drafter's
"auto" template."""

from __future__ import annotations

import json

import pytest
import torch

from tests import models as tiny
from tokprune.spec import cost as C
from tokprune.spec.trees import paper_template, recycling_template

PROBS = [0.45 * 0.5 ** r for r in range(8)]


def _brute_best(table, cands, probs):
    vals = [(1 + t.expected_accepted(probs)) / C.interpolate_cost(table, t.num_nodes) for t in cands]
    return cands[max(range(len(cands)), key=lambda i: (vals[i], -cands[i].num_nodes))], max(vals)


def test_interpolation():
    table = {1: 10.0, 8: 17.0, 16: 33.0}
    assert C.interpolate_cost(table, 8) == 17.0
    assert C.interpolate_cost(table, 4) == pytest.approx(10.0 + 7.0 * 3 / 7)
    assert C.interpolate_cost(table, 32) == pytest.approx(33.0 + 16.0 * 2)  # extrapolated slope
    assert C.interpolate_cost({1: 5.0, 2: 4.0}, 10) == 4.0  # never below the smallest measured time
    with pytest.raises(ValueError, match="empty"):
        C.interpolate_cost({}, 3)


@pytest.mark.parametrize("name,table,expect", [
    # a GPU-like table (flat): the biggest tree wins, the paper's 81-node template
    ("flat", {n: 10.0 for n in (1, 8, 16, 32, 64, 81)}, "paper"),
    # every extra node costs as much as a whole 1-token forward: the 1-node tree (no speculation)
    ("linear", {n: 10.0 * n for n in (1, 2, 4, 8, 16, 32, 64, 81)}, 1),
    # a CPU-like table: cheap up to 8 nodes, steep after: a middle size
    ("knee", {1: 10.0, 4: 11.0, 8: 12.0, 16: 25.0, 32: 50.0, 64: 100.0, 81: 126.0}, None),
])
def test_choice_on_synthetic_cost_tables(name, table, expect):
    cands = C.candidate_templates(8, C.DEFAULT_SIZES, PROBS)
    best, value = C.choose_template(table, cands, PROBS)
    ref, ref_value = _brute_best(table, cands, PROBS)
    assert best.num_nodes == ref.num_nodes and value == pytest.approx(ref_value)
    if expect == "paper":
        assert best.paths() == paper_template().paths()
    elif expect is not None:
        assert best.num_nodes == expect
    else:
        assert 4 <= best.num_nodes <= 16
        # moving one size up or down in the grid is not better
        for t in cands:
            assert C.expected_tokens_per_ms(t, table, PROBS) <= value + 1e-12


def test_candidates_are_pruned_paper_templates():
    paper = paper_template()
    cands = C.candidate_templates(8, (1, 5, 12, 40, 81, 100), PROBS)
    assert [t.num_nodes for t in cands] == [1, 5, 12, 40, 81, 81]
    full = set(paper.paths())
    reach = dict(zip(paper.paths(), paper.reach(PROBS)))
    for t in cands:
        paths = t.paths()
        assert set(paths) <= full  # a sub-tree of the paper's template
        assert all(p[:-1] in set(paths) for p in paths[1:])  # closed under parents
        # the kept nodes are the most likely ones
        kept_min = min(reach[p] for p in paths)
        dropped = [reach[p] for p in full - set(paths)]
        assert not dropped or max(dropped) <= kept_min
    assert cands[-2].paths() == paper.paths()
    # k < 8 cannot use the paper's ranks: heuristic templates of the requested sizes
    small = C.candidate_templates(4, (1, 6, 10), PROBS)
    assert [t.num_nodes for t in small] == [1, 6, 10] and all(int(t.ranks.max()) < 4 for t in small)


def test_forward_cost_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKPRUNE_CACHE", str(tmp_path))
    model = tiny.tiny_llama()
    calls = []
    real = C.measure_forward_cost

    def counting(m, sizes, **kw):
        calls.append(tuple(sizes))
        return real(m, sizes, context=16, rounds=1)

    monkeypatch.setattr(C, "measure_forward_cost", counting)
    sizes = (1, 4, 8)
    first = C.forward_cost(model, sizes=sizes)
    second = C.forward_cost(model, sizes=sizes)
    assert len(calls) == 1 and first == second
    assert sorted(first) == [1, 4, 8] and all(v > 0 for v in first.values())
    data = json.loads((tmp_path / "spec_cost.json").read_text())
    key = C.cost_key(model)
    assert key in data and "threads=" in key and "float32" in key
    assert {int(k): v for k, v in data[key]["ms"].items()} == first
    C.forward_cost(model, sizes=sizes, refresh=True)
    assert len(calls) == 2


def test_auto_template_uses_the_cost_model(tmp_path, monkeypatch):
    from tokprune.spec import TokenRecyclingDrafter, generate

    monkeypatch.setenv("TOKPRUNE_CACHE", str(tmp_path))
    model = tiny.tiny_llama()
    steep = {n: 10.0 * n for n in C.DEFAULT_SIZES}
    monkeypatch.setattr(C, "forward_cost", lambda m, refresh=False: steep)
    d = TokenRecyclingDrafter(k=8)
    ids = torch.randint(3, 150, (1, 10), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, drafter=d, max_new_tokens=6, eos_token_id=None)
    assert d.template.num_nodes == 1  # steep cost: no speculation pays
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                         eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)
    flat = {n: 10.0 for n in C.DEFAULT_SIZES}
    monkeypatch.setattr(C, "forward_cost", lambda m, refresh=False: flat)
    d2 = TokenRecyclingDrafter(k=8)
    generate(model, ids, drafter=d2, max_new_tokens=6, eos_token_id=None)
    assert d2.template.paths() == paper_template().paths()
    with pytest.raises(ValueError, match="template name"):
        TokenRecyclingDrafter(template="nope")
    with pytest.raises(ValueError, match="k="):
        TokenRecyclingDrafter(k=4, template="paper")
