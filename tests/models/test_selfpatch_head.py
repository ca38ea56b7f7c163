"""SelfPatch head: neighbour tables, class attention by hand, local summaries by brute force."""
import pytest
import torch

from models.selfpatch_head import SelfPatchHead, neighbour_table


def brute_force_neighbours(side: int, patch: int) -> list[int]:
    """The 3x3 window around ``patch`` with wrap-around, itself excluded, ascending."""
    row, col = divmod(patch, side)
    window = {((row + dy) % side) * side + (col + dx) % side for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    return sorted(window - {patch})


@pytest.mark.parametrize("side", [14, 6])
def test_wrapped_tables_match_brute_force(side):
    index, valid = neighbour_table((side, side))
    assert index.shape == (side * side, 8) and valid.all()
    assert index.tolist() == [brute_force_neighbours(side, p) for p in range(side * side)]


def test_unwrapped_tables_keep_only_real_neighbours():
    index, valid = neighbour_table((4, 5), wrap=False)
    counts = valid.sum(1).view(4, 5)
    assert counts[0, 0] == counts[-1, -1] == 3 and counts[0, 2] == 5 and counts[1, 1] == 8
    assert sorted(index[0][valid[0]].tolist()) == [1, 5, 6]
    with pytest.raises(ValueError, match="smaller than"):
        neighbour_table((2, 5))


def reference_class_attention(block, x, cls):
    """One class-attention block written out with an explicit softmax."""
    u = block.norm1(torch.cat([cls, x], dim=1))
    heads, d = block.attn.num_heads, x.shape[-1] // block.attn.num_heads
    q = block.attn.q(u[:, :1]).view(len(x), 1, heads, d).transpose(1, 2)
    k = block.attn.k(u).view(len(x), -1, heads, d).transpose(1, 2)
    v = block.attn.v(u).view(len(x), -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)
    cls = cls + block.attn.proj((weights @ v).transpose(1, 2).reshape(len(x), 1, -1))
    return cls + block.mlp(block.norm2(cls))


def test_student_output_by_hand():
    torch.manual_seed(0)
    head = SelfPatchHead(dim=24, num_heads=3)
    x = torch.randn(2, 16, 24)
    cls = head.cls_token.expand(2, -1, -1)
    for block in head.cls_blocks:
        cls = reference_class_attention(block, x, cls)
    torch.testing.assert_close(head(x), head.norm(torch.cat([cls, x], dim=1)))


@pytest.mark.parametrize("wrap", [True, False])
def test_teacher_patch_targets_summarise_their_most_similar_neighbours(wrap):
    torch.manual_seed(0)
    head = SelfPatchHead(dim=24, num_heads=3, k_num=4, wrap=wrap)
    x = torch.randn(2, 20, 24)
    out = head(x, local=True, grid=(4, 5))
    assert out.shape == (2, 21, 24)
    torch.testing.assert_close(out[:, :1], head(x)[:, :1])  # the CLS is the same global summary
    index, valid = neighbour_table((4, 5), wrap=wrap)
    for b, patch in [(0, 0), (1, 7), (1, 19)]:
        candidates = index[patch][valid[patch]].tolist()
        unit = torch.nn.functional.normalize(x[b], dim=-1)
        scores = torch.stack([unit[c] @ unit[patch] for c in candidates])
        chosen = [candidates[i] for i in scores.topk(min(4, len(candidates))).indices.tolist()]
        summary = head.cls_token
        for block in head.cls_blocks:
            summary = reference_class_attention(block, x[b, chosen][None], summary)
        torch.testing.assert_close(out[b, 1 + patch], head.norm(summary)[0, 0], atol=1e-5, rtol=1e-4)
