"""Tree attention on a tiny Llama: one forward over a token tree (4D mask + tree positions, prefix in a
DynamicCache) gives, at every node, the logits of its root-to-node path run as a plain causal sequence.
Then the DynamicCache compacted to the accepted path continues exactly like the plain sequence."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.helpers import assert_close
from tests.models import tiny_llama
from tokprune.hf.cache import compact_dynamic_cache
from tokprune.ops import spec as S

PARENTS = [-1, 0, 0, 1, 1, 2, 3, 3, 6, -1, 5]  # node 9 is a padding node


def _plain_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_logits_equal_path_logits(attn):
    model = tiny_llama(attn_implementation=attn)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    bsz, n = 2, len(PARENTS)
    prefix_len = 6
    # row 1 is left-padded by 2 tokens in the prefix
    prefix = torch.randint(vocab, (bsz, prefix_len), generator=g)
    prefix_mask = torch.ones(bsz, prefix_len, dtype=torch.long)
    prefix_mask[1, :2] = 0
    real_len = prefix_mask.sum(1)
    parents = torch.tensor([PARENTS, PARENTS], dtype=torch.int32)
    parents[1, 7] = 1  # a different tree in row 1
    tokens = torch.randint(vocab, (bsz, n), generator=g)

    cache = DynamicCache()
    prefix_pos = (prefix_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        model(input_ids=prefix, attention_mask=prefix_mask, position_ids=prefix_pos, past_key_values=cache)
        mask = S.tree_attention_mask(parents, prefix_len, torch.float32, prefix_mask=prefix_mask)
        pos = S.tree_positions(parents, real_len)
        tree_logits = model(input_ids=tokens, attention_mask=mask, position_ids=pos, past_key_values=cache).logits

    paths = S.tree_to_paths(parents)
    for b in range(bsz):
        real_prefix = prefix[b, prefix_len - int(real_len[b]):].tolist()
        depth = S.tree_depths(parents)[b]
        for i in range(n):
            if depth[i] < 0:
                continue  # padding node
            # root-to-node path from any leaf row containing i
            row = paths[b][(paths[b] == i).any(-1)][0]
            path = row[: int(depth[i]) + 1].tolist()
            assert path[-1] == i
            plain = _plain_logits(model, real_prefix + tokens[b, path].tolist())
            assert_close(tree_logits[b, i], plain[-1], atol=2e-5, rtol=1e-4, name=f"row {b} node {i} ({attn})")

    # compact the cache to an accepted path per row (same length) and continue with one token
    accept_index = torch.tensor([[0, 1, 3, 6], [0, 2, 5, 10]])
    new_len = compact_dynamic_cache(cache, prefix_len, accept_index)
    assert new_len == prefix_len + 4 and cache.get_seq_length() == new_len
    nxt = torch.randint(vocab, (bsz, 1), generator=g)
    full_mask = torch.cat([prefix_mask, torch.ones(bsz, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        step = model(input_ids=nxt, attention_mask=full_mask, position_ids=(real_len + 4).unsqueeze(1),
                     past_key_values=cache).logits[:, -1]
    for b in range(bsz):
        real_prefix = prefix[b, prefix_len - int(real_len[b]):].tolist()
        plain = _plain_logits(model, real_prefix + tokens[b, accept_index[b]].tolist() + nxt[b].tolist())
        assert_close(step[b], plain[-1], atol=2e-5, rtol=1e-4, name=f"after compaction row {b}")
