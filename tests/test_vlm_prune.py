"""Visual-token pruning inside tiny Llava / Qwen2-VL (tokprune.hf.vlm + tokprune.methods).

The central check is an exact oracle: the patched model's generation equals running the UNPATCHED
model's modules by hand, layer by layer, with the same visual tokens removed at layer K (full recompute
at every decode step, so it does not share the patch's KV-cache bookkeeping).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import models as tiny
from tests.helpers import assert_close
from tokprune.hf.vlm import prune_visual_tokens, select_visual_slots
from tokprune.methods.entropy_prune import (EntropyPrune, collapse_layer,
                                            find_collapse_layer, flops_matched_keep, visual_entropy_curve)
from tokprune.methods.visual_baselines import DivPrune, FastV, RandomPrune, max_min_order

# ----------------------------------------------------------------------------------------------------- inputs
QWEN_GRID = (1, 4, 8)  # 32 patches -> 8 visual tokens after the 2x2 merge
QWEN_TOKENS = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2] // 4


def llava_batch(images_per_row=(2, 2), pad=(0, 3), seed=0):
    """Left-padded Llava prompts with several images per row: ``dict(input_ids, pixel_values, attention_mask)``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_img in images_per_row:
        parts = [torch.randint(0, 100, (2,), generator=g)]
        for _ in range(n_img):
            parts += [torch.full((tiny.LLAVA_TOKENS_PER_IMAGE,), tiny.LLAVA_IMAGE_TOKEN),
                      torch.randint(0, 100, (3,), generator=g)]
        rows.append(torch.cat(parts))
    width = max(len(r) + p for r, p in zip(rows, pad))
    ids = torch.full((len(rows), width), 2, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        am[b, width - len(r):] = 1
    pv = torch.randn(sum(images_per_row), 3, tiny.LLAVA_IMAGE_SIZE, tiny.LLAVA_IMAGE_SIZE, generator=g)
    return dict(input_ids=ids, pixel_values=pv, attention_mask=am)


def qwen_batch(images_per_row=(2, 1), seed=0):
    """Left-padded Qwen2-VL prompts (vision_start, image tokens, vision_end) with ``image_grid_thw`` and
    ``mm_token_type_ids``."""
    ids_cfg = tiny.QWEN2VL_IDS
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_img in images_per_row:
        parts = [torch.randint(3, 100, (2,), generator=g)]
        for _ in range(n_img):
            parts += [torch.tensor([ids_cfg["vision_start_token_id"]]),
                      torch.full((QWEN_TOKENS,), ids_cfg["image_token_id"]),
                      torch.tensor([ids_cfg["vision_end_token_id"]]), torch.randint(3, 100, (3,), generator=g)]
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 2, dtype=torch.long)
    am = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        am[b, width - len(r):] = 1
    n_images = sum(images_per_row)
    patches = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2]
    pv = torch.randn(n_images * patches, 3 * 2 * 14 * 14, generator=g)
    grid = torch.tensor([QWEN_GRID] * n_images)
    mm = (ids == ids_cfg["image_token_id"]).int()
    return dict(input_ids=ids, pixel_values=pv, attention_mask=am, image_grid_thw=grid, mm_token_type_ids=mm)


def row_of(inputs, b, images_per_row, patches_per_image=None):
    """Row ``b`` of a batch alone, without its padding."""
    keep = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    first = sum(images_per_row[:b])
    n = images_per_row[b]
    if "image_grid_thw" in inputs:
        out["image_grid_thw"] = inputs["image_grid_thw"][first:first + n]
        out["pixel_values"] = inputs["pixel_values"][first * patches_per_image:(first + n) * patches_per_image]
    else:
        out["pixel_values"] = inputs["pixel_values"][first:first + n]
    return out


# ----------------------------------------------------------------------------------------------------- oracle
class _Stop(Exception):
    pass


def lm_entrance(model, inputs):
    """``(inputs_embeds, position_ids)`` the VLM feeds its language model for ``inputs`` (unpatched)."""
    lm = model.model.language_model
    grabbed = {}

    def hook(module, args, kwargs):
        grabbed.update(kwargs)
        raise _Stop

    h = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    pos = grabbed["position_ids"]
    if pos is not None and pos.dim() == 3 and pos.shape[0] == 4:  # Qwen2-VL: text row + 3 rope rows
        pos = pos[1:]
    return grabbed["inputs_embeds"], pos


def llava_positions(am):
    return (am.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def oracle_logits(model, embeds, am, pos, layer, slots, key_ok, prompt_len):
    """Unpatched modules run by hand: full sequence below ``layer``; at ``layer`` keep the prompt tokens
    ``slots`` (visible as keys where ``key_ok``) plus every token after the first ``prompt_len``.
    Returns logits at the kept positions ``(B, L + n_after, V)``."""
    lm = model.model.language_model
    am = am.bool()
    batch, total, _ = embeds.shape
    cos, sin = lm.rotary_emb(embeds, pos)
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)

    def mask_for(ok):
        n = ok.shape[1]
        allowed = (torch.ones(n, n, dtype=torch.bool).tril() & ok[:, None, :]) | torch.eye(n, dtype=torch.bool)
        if model.config.text_config._attn_implementation == "eager":
            return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        return allowed[:, None]

    h = embeds
    mask = mask_for(am)
    for i, block in enumerate(lm.layers):
        if i == layer and slots is not None:
            after = torch.arange(prompt_len, total).expand(batch, -1)
            idx = torch.cat([slots, after], 1)
            ok = torch.cat([key_ok, am[:, prompt_len:]], 1)
            h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
            cos = cos.gather(1, idx[..., None].expand(-1, -1, cos.shape[-1]))
            sin = sin.gather(1, idx[..., None].expand(-1, -1, sin.shape[-1]))
            mask = mask_for(ok)
        h = block(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None)
        if isinstance(h, tuple):
            h = h[0]
    return model.lm_head(lm.norm(h))


@torch.no_grad()
def oracle_generate(model, inputs, layer, slots, key_ok, n_new):
    """Greedy decode by full recompute through :func:`oracle_logits` (same pruning every step)."""
    embeds, pos = lm_entrance(model, inputs)
    am = inputs["attention_mask"].bool()
    if model.config.model_type == "llava":  # what generate passes: positions from the attention mask
        pos = llava_positions(am)
    prompt_len = embeds.shape[1]
    embed = model.get_input_embeddings()
    tokens = []
    for _ in range(n_new):
        logits = oracle_logits(model, embeds, am, pos, layer, slots, key_ok, prompt_len)
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
        embeds = torch.cat([embeds, embed(nxt)[:, None]], 1)
        am = torch.cat([am, torch.ones(am.shape[0], 1, dtype=torch.bool)], 1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
    return torch.stack(tokens, 1)


def tiny_qwen2_5_vl(attn="sdpa"):
    """Qwen2.5-VL with a 2-block windowed vision tower and the 3-layer M-RoPE language model of tiny Qwen2-VL."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(tiny.TINY_TEXT, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tiny.QWEN2VL_IDS)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build(kind, attn="sdpa"):
    """``(model, inputs, images per row)``; the builders take the attention implementation, which the
    conftest fixtures (used where the default suffices) do not."""
    if kind == "llava":
        return tiny.tiny_llava(attn), llava_batch(), (2, 2)
    if kind == "qwen2_5_vl":
        return tiny_qwen2_5_vl(attn), qwen_batch(), (2, 1)
    return tiny.tiny_qwen2_vl(attn), qwen_batch(), (2, 1)


def generate(model, inputs, n_new=5):
    """Greedy tokens after the prompt; no EOS, so every row decodes ``n_new`` tokens like the oracle."""
    model.generation_config.eos_token_id = None
    out = model.generate(**inputs, max_new_tokens=n_new, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


# ----------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("kind,attn,policy", [
    ("llava", "sdpa", EntropyPrune(keep=5, layer=2)),
    ("llava", "eager", FastV(keep=7, layer=1)),
    ("qwen2_vl", "sdpa", EntropyPrune(keep=3, layer=1, normalize=True)),
    ("qwen2_vl", "sdpa", DivPrune(keep=4, layer=2)),
    ("qwen2_5_vl", "sdpa", EntropyPrune(keep=3, layer=1)),
])
def test_generation_equals_layerwise_oracle(kind, attn, policy):
    model, inputs, _ = build(kind, attn)
    with prune_visual_tokens(model, policy) as handle:
        got = generate(model, inputs)
        slots, real = handle.info["last"]["slots"], handle.info["last"]["real"]
        key_ok = real & inputs["attention_mask"].bool().gather(1, slots)
        # prefill logits of the patched forward at every real kept position
        fwd = dict(inputs)
        if kind == "llava":
            fwd["position_ids"] = llava_positions(inputs["attention_mask"])
        with torch.no_grad():
            logits = model(**fwd).logits
    assert handle.info["last"]["tokens_after"] < handle.info["last"]["tokens_before"]
    assert handle.info["last"]["visual_kept"] == [min(policy.keep, v) for v in handle.info["last"]["visual_before"]]
    want = oracle_generate(model, inputs, handle.info["layer"], slots, key_ok, got.shape[1])
    assert_close(got, want, name="generated tokens")
    embeds, pos = lm_entrance(model, inputs)
    if kind == "llava":
        pos = llava_positions(inputs["attention_mask"])
    ref = oracle_logits(model, embeds, inputs["attention_mask"], pos, handle.info["layer"], slots, key_ok, embeds.shape[1])
    assert logits.shape == ref.shape
    assert_close(logits[key_ok], ref[key_ok], name="prefill logits")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_keep_all_visual_tokens_equals_unpruned(kind):
    model, inputs, _ = build(kind)
    with torch.no_grad():
        want_logits = model(**inputs).logits
    want = generate(model, inputs)
    with prune_visual_tokens(model, EntropyPrune(keep=10_000, layer=1)) as handle:
        got = generate(model, inputs)
        with torch.no_grad():
            got_logits = model(**inputs).logits
    assert handle.info["last"]["tokens_after"] == handle.info["last"]["tokens_before"]
    assert_close(got, want, name="tokens")
    valid = inputs["attention_mask"].bool()
    assert_close(got_logits[valid], want_logits[valid], name="logits")


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_rows_with_different_image_counts_match_rows_alone(kind, request):
    model = request.getfixturevalue(f"tiny_{kind}")  # conftest fixtures
    if kind == "llava":
        per_row = (2, 1)
        inputs, patches = llava_batch(images_per_row=per_row, pad=(0, 0)), None
    else:
        per_row = (1, 2)
        inputs, patches = qwen_batch(images_per_row=per_row), QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2]
    policy = EntropyPrune(keep=6, layer=1)
    with prune_visual_tokens(model, policy) as handle:
        got = generate(model, inputs, n_new=4)
        kept_batch = handle.info["last"]["kept"]
        real = handle.info["last"]["real"]
        for b in range(2):
            alone = generate(model, row_of(inputs, b, per_row, patches), n_new=4)
            assert_close(got[b:b + 1], alone, name=f"row {b} tokens")
    # rows pruned different amounts: the shorter one is padded with masked slots
    assert kept_batch[0] != kept_batch[1]
    assert int((~real).sum()) == abs(kept_batch[0] - kept_batch[1])


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_kv_cache_of_pruned_layers_is_shorter(kind):
    model, inputs, _ = build(kind)
    layer = 2
    with prune_visual_tokens(model, RandomPrune(keep=3, layer=layer, seed=1)) as handle:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    n = inputs["input_ids"].shape[1]
    lengths = [cache.layers[i].keys.shape[-2] for i in range(len(cache.layers))]
    assert lengths[:layer] == [n] * layer
    assert lengths[layer:] == [handle.info["last"]["tokens_after"]] * (len(lengths) - layer)
    visual = sum(handle.info["last"]["visual_before"]) // 2  # every row keeps 3 of its own
    assert handle.info["last"]["tokens_after"] < n and handle.info["last"]["visual_kept"] == [3, 3]


def test_hooks_removed_even_on_error(tiny_llava):
    inputs = llava_batch()
    with torch.no_grad():
        want = tiny_llava(**inputs).logits
    counts = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tiny_llava.modules())  # noqa: E731
    before = counts()
    with pytest.raises(RuntimeError, match="boom"):
        with prune_visual_tokens(tiny_llava, EntropyPrune(keep=2, layer=1)):
            assert counts() > before
            raise RuntimeError("boom")
    assert counts() == before and not hasattr(tiny_llava, "_tokprune_vlm_patch")
    with torch.no_grad():
        assert_close(tiny_llava(**inputs).logits, want, name="logits after removal")


def test_errors(tiny_llava, tiny_llama):
    with pytest.raises(ValueError, match="keep must be a non-negative int"):
        prune_visual_tokens(tiny_llava, EntropyPrune(keep=-1, layer=1))
    for bad in (0, 3, -1):
        with pytest.raises(ValueError, match=f"layer={bad} is out of range"):
            prune_visual_tokens(tiny_llava, EntropyPrune(keep=2, layer=bad))
    with pytest.raises(ValueError, match="not a supported vision-language model"):
        prune_visual_tokens(tiny_llama, EntropyPrune(keep=2, layer=1))
    with pytest.raises(ValueError, match="needs calibration"):
        prune_visual_tokens(tiny_llava, EntropyPrune(keep=2, layer="auto"))
    with pytest.raises(ValueError, match="FastV does not support layer='auto'"):
        prune_visual_tokens(tiny_llava, FastV(keep=2, layer="auto"))
    with pytest.raises(ValueError, match="layer must be an int"):
        prune_visual_tokens(tiny_llava, RandomPrune(keep=2, layer="2"))
    with prune_visual_tokens(tiny_llava, EntropyPrune(keep=2, layer=1)):
        with pytest.raises(ValueError, match="already patched"):
            prune_visual_tokens(tiny_llava, FastV(keep=2, layer=1))


def test_prompt_without_images_is_not_pruned(tiny_llava):
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        want = tiny_llava(input_ids=ids).logits
        with prune_visual_tokens(tiny_llava, EntropyPrune(keep=0, layer=1)) as handle:
            got = tiny_llava(input_ids=ids).logits
    assert handle.info["last"] == {}
    assert_close(got, want, name="logits")


def test_keep_zero_drops_every_visual_token(tiny_llava):
    inputs = llava_batch()
    with prune_visual_tokens(tiny_llava, EntropyPrune(keep=0, layer=2)) as handle:
        generate(tiny_llava, inputs, n_new=2)
    assert handle.info["last"]["visual_kept"] == [0, 0]
    assert handle.info["last"]["tokens_after"] == handle.info["last"]["tokens_before"] - 2 * tiny.LLAVA_TOKENS_PER_IMAGE


# ----------------------------------------------------------------------------------------------------- scores
def rope_by_hand(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def entropy_by_hand(q, normalize):
    """Per token: centre the (H, d) query across heads, eigenvalues of Z Zᵀ / H, -Σ λ log λ / log H."""
    batch, n, heads, _ = q.shape
    out = torch.empty(batch, n, dtype=torch.float64)
    for b in range(batch):
        for t in range(n):
            z = q[b, t].double()
            z = z - z.mean(0)
            lam = torch.linalg.eigvalsh(z @ z.T / heads)
            if normalize:
                lam = lam / lam.sum()
            lam = lam.clamp_min(1e-10)
            out[b, t] = -(lam * lam.log()).sum() / math.log(heads)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_entropy_prune_keeps_top_tokens_of_independent_scores(tiny_llava, normalize):
    inputs = llava_batch()
    layer, keep = 2, 6
    lm = tiny_llava.model.language_model
    embeds, _ = lm_entrance(tiny_llava, inputs)
    pos = llava_positions(inputs["attention_mask"])
    grabbed = {}
    hook = lm.layers[layer - 1].self_attn.register_forward_pre_hook(
        lambda m, a, k: grabbed.update(h=k["hidden_states"], pe=k["position_embeddings"]), with_kwargs=True)
    try:
        with torch.no_grad():
            tiny_llava(**inputs, position_ids=pos)
    finally:
        hook.remove()
    attn = lm.layers[layer - 1].self_attn
    q = attn.q_proj(grabbed["h"]).view(*grabbed["h"].shape[:2], -1, attn.head_dim)
    q = rope_by_hand(q, *grabbed["pe"]).detach()
    scores = entropy_by_hand(q, normalize)
    from tokprune.methods.entropy_prune import token_scores

    assert_close(token_scores(q, normalize=normalize).double(), scores, atol=1e-4, rtol=1e-4, name="scores")
    with prune_visual_tokens(tiny_llava, EntropyPrune(keep=keep, layer=layer, normalize=normalize)) as handle:
        with torch.no_grad():
            tiny_llava(**inputs, position_ids=pos)
    visual = inputs["input_ids"] == tiny.LLAVA_IMAGE_TOKEN
    for b in range(2):
        vis = visual[b].nonzero().squeeze(1)
        expected = vis[scores[b, vis].argsort(descending=True, stable=True)[:keep]].sort().values
        got = handle.info["last"]["slots"][b][visual[b, handle.info["last"]["slots"][b]] & handle.info["last"]["real"][b]]
        assert_close(got, expected, name=f"kept visual tokens row {b}")


def test_fastv_scores_equal_eager_attention_weights():
    model = tiny.tiny_llava("eager")
    inputs = llava_batch()
    layer = 2
    pos = llava_positions(inputs["attention_mask"])
    with torch.no_grad():
        out = model(**inputs, position_ids=pos, output_attentions=True)
    attn = out.attentions[layer - 1]  # (B, H, N, N) at layer K-1
    captured = {}
    policy = FastV(keep=5, layer=layer)
    original = policy.score

    def spy(ctx):
        captured["scores"] = original(ctx)
        return captured["scores"]

    object.__setattr__(policy, "score", spy)
    with prune_visual_tokens(model, policy):
        with torch.no_grad():
            model(**inputs, position_ids=pos)
    want = attn[:, :, -1, :].mean(1)  # last token (left padding: the last real token), head average
    assert_close(captured["scores"], want, name="FastV scores")


def max_min_by_hand(feats, steps):
    """Greedy max-min on one row, plain Python loops."""
    n = feats.shape[0]
    unit = feats / feats.norm(dim=-1, keepdim=True)
    d = 1 - unit @ unit.T
    nearest = [min(float(d[i, j]) for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picks) < min(steps, n):
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(float(d[i, p]) for p in picks), -i)))
    return picks


def test_divprune_matches_plain_greedy_and_respects_mask():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 13, 8, generator=g)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    scores = max_min_order(feats, mask, 5)
    for b in range(2):
        cand = mask[b].nonzero().squeeze(1)
        picks = [int(cand[i]) for i in max_min_by_hand(feats[b, cand], 5)]
        order = scores[b].argsort(descending=True)[:5].tolist()
        assert order == picks
        assert bool((scores[b][~mask[b]] == -1).all())


def test_random_prune_is_seeded(tiny_llava):
    inputs = llava_batch()
    kept = []
    for seed in (0, 0, 1):
        with prune_visual_tokens(tiny_llava, RandomPrune(keep=4, layer=1, seed=seed)) as handle:
            with torch.no_grad():
                tiny_llava(**inputs)
        kept.append(handle.info["last"]["slots"])
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


def test_select_visual_slots_layout():
    scores = torch.tensor([[0., 5., 1., 4., 0.], [0., 2., 3., 0., 0.]])
    visual = torch.tensor([[False, True, True, True, False], [False, True, True, False, False]])
    slots, real = select_visual_slots(scores, visual, 2)
    # row 0 drops token 2 (lowest of its 3 visual scores), row 1 keeps both: token 2 of row 0 stays as a
    # masked filler so that both rows have length 5
    assert slots.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert real.tolist() == [[True, True, False, True, True], [True] * 5]
    slots, real = select_visual_slots(scores, visual, 1)
    # row 0 drops 2, row 1 drops 1 -> row 0 gets one masked filler (its earliest dropped token, 2)
    assert slots.tolist() == [[0, 1, 2, 4], [0, 2, 3, 4]]
    assert real.tolist() == [[True, True, False, True], [True, True, True, True]]


# ----------------------------------------------------------------------------------------------------- auto layer
def test_collapse_layer_picks_sharpest_drop():
    assert collapse_layer([0.9, 0.88, 0.5, 0.45, 0.44]) == 2
    assert collapse_layer([0.9, 0.3, 0.29, 0.2]) == 1
    with pytest.raises(ValueError):
        collapse_layer([0.5, 0.4])


def test_auto_layer_calibration(tiny_llava):
    inputs = llava_batch()
    layer, curve = find_collapse_layer(tiny_llava, **inputs)
    assert len(curve) == 4 and 1 <= layer <= 2
    drops = [curve[i - 1] - curve[i] for i in (1, 2)]
    assert layer == 1 + max(range(2), key=lambda i: drops[i])
    # entry 0 is the entropy of the visual embeddings themselves
    embeds, _ = lm_entrance(tiny_llava, inputs)
    visual = inputs["input_ids"] == tiny.LLAVA_IMAGE_TOKEN

    def entropy(x):  # centred, L2-normalised rows; trace-normalised spectrum; / log min(N, D)
        z = x.double() - x.double().mean(0)
        z = z / z.norm(dim=1, keepdim=True)
        lam = torch.linalg.eigvalsh(z.T @ z)
        p = (lam / lam.sum()).clamp_min(1e-300)
        return float(-(p * p.log()).sum() / math.log(min(x.shape)))

    first = sum(entropy(embeds[b][visual[b]]) for b in range(2)) / 2
    assert abs(curve[0] - first) < 1e-4
    assert curve == visual_entropy_curve(tiny_llava, **inputs)
    with prune_visual_tokens(tiny_llava, EntropyPrune(keep=3, layer="auto"), calibration=inputs) as handle:
        assert handle.info["layer"] == layer


def test_flops_matched_budgets_match_the_paper():
    # EntropyPrune / LLaVA-1.5: 192/128/64 average tokens -> 166/98/29 kept from layer 2 of 32.
    assert [flops_matched_keep(a, 576, 32, 2) for a in (192, 128, 64)] == [166, 98, 29]
    with pytest.raises(ValueError):
        flops_matched_keep(64, 576, 32, 32)


def test_policy_call_patches_like_kvpress(tiny_llava):
    import tokprune.methods as methods

    inputs = llava_batch()
    from tokprune.methods.base import PatchHandle

    policy = methods.EntropyPrune(keep=2, layer=1)
    with policy(tiny_llava) as handle:
        assert isinstance(handle, PatchHandle) and handle.policies == [policy] and handle.active
        assert hasattr(tiny_llava, "_tokprune_vlm_patch")
        with torch.no_grad():
            tiny_llava(**inputs)
    assert handle.info["last"]["visual_kept"] == [2, 2] and not hasattr(tiny_llava, "_tokprune_vlm_patch")
    assert not handle.active
    handle.remove()  # idempotent


def test_eval_entropy_reports_collapse_layer_and_counts(capsys):
    import re

    from tokprune.evals.entropy import main

    assert main(["--model", "llava", "--layers", "4", "--images", "1", "--keep", "5"]) == 0
    out = capsys.readouterr().out
    curve = [float(v) for v in re.findall(r"^\s+\d+\s+([01]\.\d{4})", out, flags=re.M)]
    assert len(curve) == 5
    chosen = int(re.search(r"layer='auto'\) -> layer (\d+)", out).group(1))
    assert chosen == collapse_layer(curve)
    assert "visual tokens [64] -> [5]" in out and "No VLM weights are reachable" in out


def test_manual_prefill_then_decode_with_returned_cache(tiny_llava):
    """A cache created inside the prefill forward (not by generate) is decoded against correctly."""
    inputs = llava_batch()
    am = inputs["attention_mask"]
    pos = llava_positions(am)
    policy = EntropyPrune(keep=4, layer=2)
    with prune_visual_tokens(tiny_llava, policy):
        want = generate(tiny_llava, inputs, n_new=2)
        with torch.no_grad():
            out = tiny_llava(**inputs, position_ids=pos, use_cache=True)
            first = out.logits[:, -1].argmax(-1)
            cache = getattr(out, "cache", None) or out.past_key_values
            step = tiny_llava(input_ids=first[:, None], attention_mask=torch.cat([am, torch.ones_like(am[:, :1])], 1),
                              position_ids=pos[:, -1:] + 1, cache=cache, use_cache=True)
    assert_close(torch.stack([first, step.logits[:, -1].argmax(-1)], 1), want, name="manual decode tokens")
