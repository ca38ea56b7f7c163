"""DoRA: object discovery, tracking, masking and the loss, against hand-built cases and a loop-style
transcription of the reference behaviour (objectives spec §4.a and §7.4; DoRA_ICLR24 utils.py `MOT`,
sinkhorn_knopp.py `SinkhornKnopp`, main.py `DINOLoss`), written from the spec, not copied."""
import math

import pytest
import torch
import torch.nn.functional as F

from train.objectives.dora import DoRA, DoRAConfig, discover_objects, dora_loss, mask_frames, track_objects

TINY = dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, frames=3, local_crops=3,
            global_size=48, local_size=16)


# --- the reference, transcribed loop by loop from the spec -------------------------------------------

def reference_sinkhorn(logits, epsilon=0.05, iterations=30):
    """SinkhornKnopp.forward on (B, N, k): per-sample max subtracted, rows (objects) to 1/k, columns
    (patches) to 1/N, times N, transposed."""
    out = torch.empty_like(logits)
    for b in range(logits.shape[0]):
        scaled = logits[b] / epsilon
        q = torch.exp(scaled - scaled.max()).T.clone()            # (k, N)
        q /= q.sum()
        k, n = q.shape
        for _ in range(iterations):
            for i in range(k):
                q[i] = q[i] / q[i].sum() / k
            for j in range(n):
                q[:, j] = q[:, j] / q[:, j].sum() / n
        out[b] = (q * n).T
    return out


def concat_heads(x):
    """(B, heads, N, d) -> (B, N, heads * d), head-major along the channels (einops 'b h n d -> b n (h d)')."""
    return torch.cat([x[:, h] for h in range(x.shape[1])], dim=-1)


def reference_mot(attn, query, key, teacher_patches, patch_size, images, heads):
    """utils.MOT: attn (T, B, H, 1+N, 1+N), query/key (T, B, H, 1+N, d), teacher_patches (T, B, N, C),
    images (B, T, 3, Hpx, Wpx) -> (k, B, T, 3, Hpx, Wpx)."""
    frames, batch = attn.shape[:2]
    rows, cols = images.shape[3] // patch_size, images.shape[4] // patch_size
    first_query = concat_heads(query[0][:, :, 1:])                 # (B, N, C)
    first_attn = attn[0][:, :, 0, 1:]                              # (B, H, N)
    k, n, c = len(heads), first_query.shape[1], first_query.shape[2]
    prototypes = torch.zeros(batch, k, c)
    for b in range(batch):
        for i, head in enumerate(heads):
            for j in range(n):
                prototypes[b, i] += first_attn[b, head, j] * first_query[b, j]
    features = teacher_patches[0] / teacher_patches[0].norm(dim=-1, keepdim=True)
    assignment = reference_sinkhorn(features @ prototypes.transpose(-2, -1))
    refined = torch.zeros(batch, k, c)
    for b in range(batch):
        for i in range(k):
            for j in range(n):
                refined[b, i] += assignment[b, j, i] * features[b, j]
    out = torch.zeros(k, *images.shape)
    for f in range(frames):
        key_frame = concat_heads(key[f][:, :, 1:])
        for i in range(k):
            tube = torch.stack([torch.softmax(refined[b, i] @ key_frame[b].T * c ** -0.5, dim=-1)
                                for b in range(batch)])            # (B, N)
            tube = tube / tube.norm(dim=-1, keepdim=True)
            keep = tube > tube.mean()                              # one threshold for the whole batch (D4)
            for b in range(batch):
                for j in range(n):
                    if keep[b, j]:
                        r, q = divmod(j, cols)
                        window = (slice(None), slice(r * patch_size, (r + 1) * patch_size),
                                  slice(q * patch_size, (q + 1) * patch_size))
                        out[i, b, f][window] = images[b, f][window]
    return out


class ReferenceDINOLoss:
    """main.py DINOLoss with local_crop L and global_crop 1, loops as executed (D1, D2 included)."""

    def __init__(self, out_dim, local_crops, temp, student_temp=0.1, center_momentum=0.9):
        self.center = torch.zeros(1, out_dim)
        self.local_crops, self.temp = local_crops, temp
        self.student_temp, self.center_momentum = student_temp, center_momentum

    def __call__(self, student_local, student_global, teacher_global):
        frame_loss, total_loss = 0, 0
        frames = teacher_global.shape[0]
        for masked in student_global:
            for f in range(frames):
                local = (student_local[f] / self.student_temp).chunk(self.local_crops)
                student_masked = (masked[f] / self.student_temp).chunk(1)
                teacher = F.softmax((teacher_global[f] - self.center) / self.temp, dim=-1).chunk(1)
                mask_loss, terms = 0, 0
                for q in teacher:
                    for s in student_masked:
                        mask_loss += torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                        terms += 1
                mask_loss /= terms
                local_loss, terms = 0, 0
                for iq, q in enumerate(teacher):
                    for v in range(len(local)):
                        if v == iq:
                            continue
                        local_loss += torch.sum(-q * F.log_softmax(local[v], dim=-1), dim=-1).mean()
                        terms += 1
                local_loss /= terms
                frame_loss += (mask_loss + local_loss) * 0.5
            frame_loss /= frames
            total_loss += frame_loss
        total_loss /= len(student_global)
        flat = teacher_global.reshape(-1, teacher_global.shape[-1])
        batch_center = flat.sum(0, keepdim=True) / len(flat)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total_loss


# --- discovery, tracking, masking ---------------------------------------------------------------------

def test_discovery_on_a_hand_built_attention_map():
    """Head 0 looks at the left half, head 1 at the right half; the patch features say the same."""
    rows, cols, channels = 4, 4, 8
    left = (torch.arange(rows * cols) % cols) < cols // 2                       # (16,)
    features = torch.where(left[:, None], F.one_hot(torch.tensor(0), channels).float(),
                           F.one_hot(torch.tensor(1), channels).float())         # (16, 8)
    features = features + 0.01 * torch.randn(16, channels, generator=torch.Generator().manual_seed(0))
    attention = torch.stack([left.float(), (~left).float(), torch.ones(16)]) / 8  # (3 heads, 16)
    prototypes, assignment = discover_objects(attention[None], features[None], features[None],
                                              torch.tensor([1, 0]), 0.05, 30)
    # object 0 comes from head 1 (right half), object 1 from head 0 (left half)
    assert torch.equal(assignment[0].argmax(-1), (left).long())
    torch.testing.assert_close(assignment.sum(-1), torch.ones(1, 16))
    torch.testing.assert_close(assignment.sum(1), torch.full((1, 2), 8.0), atol=1e-3, rtol=0)
    assert prototypes[0, 0].argmax() == 1 and prototypes[0, 1].argmax() == 0
    masks = track_objects(prototypes, features[None, None], "image")        # (2, 1, 1, 16)
    assert torch.equal(masks[0, 0, 0], ~left) and torch.equal(masks[1, 0, 0], left)


def test_tracking_keeps_identities_on_a_translating_object():
    """A 4x4 object moves one cell right per frame over a noisy background (4x8 grid; half of it is the
    object, so Sinkhorn's equipartition over k = 2 objects holds): object 0, discovered on it in
    frame 0, must follow it, and object 1 must stay on the background."""
    torch.manual_seed(0)
    rows, cols, channels, frames = 4, 8, 16, 4
    obj_feature, bg_feature = F.normalize(torch.randn(channels), dim=0), F.normalize(torch.randn(channels), dim=0)
    truth, tokens = [], []
    for t in range(frames):
        inside = torch.zeros(rows, cols, dtype=torch.bool)
        inside[:, t:t + 4] = True
        truth.append(inside.flatten())
        tokens.append(torch.where(inside.flatten()[:, None], obj_feature, bg_feature)
                      + 0.05 * torch.randn(rows * cols, channels))
    truth, tokens = torch.stack(truth), torch.stack(tokens)                      # (T, 32), (T, 32, C)
    attention = torch.stack([truth[0].float(), (~truth[0]).float()]) / 16        # head 0: object, 1: background
    prototypes, _ = discover_objects(attention[None], tokens[:1], tokens[:1], torch.tensor([0, 1]), 0.05, 30)
    masks = track_objects(prototypes, tokens[:, None], "image")                  # (2, 1, T, 32)
    for t in range(frames):
        assert torch.equal(masks[0, 0, t], truth[t]), t
        assert torch.equal(masks[1, 0, t], ~truth[t]), t


def test_mask_threshold_per_image_or_over_the_batch():
    prototypes = torch.randn(2, 3, 12)
    keys = torch.randn(1, 2, 9, 12)
    keys[:, 1] *= 5                                      # sample 1's attention is far more peaked
    attention = torch.einsum("bkc,tbnc->kbtn", prototypes, keys).div(12 ** 0.5).softmax(-1)
    unit = F.normalize(attention, dim=-1)
    assert torch.equal(track_objects(prototypes, keys, "image"), unit > unit.mean(-1, keepdim=True))
    batch = track_objects(prototypes, keys, "batch")
    assert torch.equal(batch, unit > unit.mean((1, 3), keepdim=True))
    assert not torch.equal(batch, track_objects(prototypes, keys, "image"))
    with pytest.raises(ValueError, match="'image' or 'batch'"):
        track_objects(prototypes, keys, "frame")


def test_refined_prototypes_are_the_assignment_weighted_token_sums():
    torch.manual_seed(1)
    attention, queries, tokens = torch.rand(2, 6, 9), torch.randn(2, 9, 12), torch.randn(2, 9, 12)
    prototypes, assignment = discover_objects(attention, queries, tokens, torch.tensor([4, 0, 2]), 0.05, 30)
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    for b in range(2):
        for i in range(3):
            pooled = sum(assignment[b, n, i] * unit[b, n] for n in range(9))
            torch.testing.assert_close(prototypes[b, i], pooled)


@pytest.mark.parametrize("keep", [True, False])
def test_masked_frames_equal_the_nearest_upsampled_mask_times_the_frames(keep):
    torch.manual_seed(2)
    frames = torch.randn(2, 3, 3, 32, 48)
    masks = torch.rand(4, 2, 3, 2 * 3) > 0.5
    dense = F.interpolate(masks.float().view(-1, 1, 2, 3), scale_factor=16, mode="nearest").view(4, 2, 3, 1, 32, 48)
    expected = frames[None] * (dense if keep else 1 - dense)
    assert torch.equal(mask_frames(frames, masks, 16, keep), expected)


# --- the loss ------------------------------------------------------------------------------------------

def test_zero_student_logits_give_the_closed_forms():
    D, T = 256, 8
    targets = torch.softmax(torch.randn(T, 2, D), -1)
    zeros_masked, zeros_local = torch.zeros(3, T, 2, D), torch.zeros(6, T, 2, D)
    as_coded = dora_loss(zeros_masked, zeros_local, targets, 0.1, skip_local_crop0=True, accumulation_bug=True)
    assert as_coded.item() == pytest.approx(math.log(D) * (3 + 2 / T + 1 / T ** 2) / 3, rel=1e-6)   # 6.0362
    assert as_coded.item() == pytest.approx(6.036157, abs=1e-6)
    intended = dora_loss(zeros_masked, zeros_local, targets, 0.1)
    assert intended.item() == pytest.approx(math.log(D), rel=1e-6)


def test_local_crop_0_counts_only_without_the_reference_skip():
    torch.manual_seed(3)
    masked, local, targets = torch.randn(3, 8, 2, 64), torch.randn(6, 8, 2, 64), torch.softmax(torch.randn(8, 2, 64), -1)
    noisy = local.clone()
    noisy[0] += torch.randn_like(noisy[0])
    skip = dict(skip_local_crop0=True)
    assert dora_loss(masked, noisy, targets, 0.1, **skip) == dora_loss(masked, local, targets, 0.1, **skip)
    assert dora_loss(masked, noisy, targets, 0.1) != dora_loss(masked, local, targets, 0.1)
    with pytest.raises(ValueError, match="at least one local crop"):
        dora_loss(masked, local[:1], targets, 0.1, **skip)


def test_loss_and_center_equal_the_reference_on_random_logits(float64):
    torch.manual_seed(0)
    T, B, D, L = 8, 2, 256, 6
    student_local = torch.randn(T, L * B, D)                          # crop-major, as the wrapper returns
    student_global = [torch.randn(T, B, D) for _ in range(3)]
    teacher_global = torch.randn(T, B, D)
    reference = ReferenceDINOLoss(D, L, 0.04)
    expected = reference(student_local, student_global, teacher_global)
    local = student_local.unflatten(1, (L, B)).transpose(0, 1)       # (L, T, B, D)
    targets = torch.softmax(teacher_global / 0.04, dim=-1)           # center 0 before the first update
    got = dora_loss(torch.stack(student_global), local, targets, 0.1, skip_local_crop0=True, accumulation_bug=True)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected.item()) <= 1e-10 * abs(expected.item())
    intended = dora_loss(torch.stack(student_global), local, targets, 0.1)
    assert abs(intended.item() - expected.item()) > 1e-3           # D1 and D2 change the value


def test_discovery_tracking_and_masking_equal_the_reference_mot(float64):
    torch.manual_seed(4)
    T, B, H, d, side, p = 3, 2, 6, 8, 4, 4
    tokens = 1 + side * side
    attn = torch.softmax(torch.randn(T, B, H, tokens, tokens), -1)
    query, key = torch.randn(T, B, H, tokens, d), torch.randn(T, B, H, tokens, d)
    patches = torch.randn(T, B, side * side, H * d)
    images = torch.randn(B, T, 3, side * p, side * p)
    heads = [1, 3, 4]
    expected = reference_mot(attn, query, key, patches, p, images, heads)
    prototypes, _ = discover_objects(attn[0, :, :, 0, 1:], concat_heads(query[0][:, :, 1:]), patches[0],
                                     torch.tensor(heads), 0.05, 30)
    keys = torch.stack([concat_heads(key[f][:, :, 1:]) for f in range(T)])
    masks = track_objects(prototypes, keys, "batch")
    got = mask_frames(images, masks, p)
    assert torch.equal(got != 0, expected != 0) and torch.equal(got, expected)
    assert 0.2 < masks.float().mean() < 0.8


def tiny_dora(**overrides):
    cfg = DoRAConfig(**{**TINY, **overrides})
    return DoRA(cfg, arch="vit_tiny_patch16", drop_path=0.0, total_steps=100, steps_per_epoch=10)


def tiny_batch(seed=0, frames=3, locals_=3):
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.randn(2, 1, frames, 3, 48, 48, generator=g),
            "local": torch.randn(2, locals_, frames, 3, 16, 16, generator=g)}


def test_module_equals_the_reference_loop_over_frames_end_to_end(float64, monkeypatch):
    """DoRA.forward (as-coded flags) against the reference's per-frame wrapper calls, MOT and DINOLoss on
    the same networks and heads, float64."""
    torch.manual_seed(5)
    model = tiny_dora(mask_threshold="batch", frame_loss_accumulation_bug=True, skip_local_crop0=True)
    model.student_head.last_layer.weight_v.data.normal_()               # a non-degenerate head
    model.teacher_head.net.load_state_dict(model.student_head.state_dict())
    model.teacher.net.blocks[-1].attn.qkv.weight.data.mul_(8)           # peaked attention, objects to find
    heads = [2, 0, 1]
    monkeypatch.setattr(model, "choose_heads", lambda: torch.tensor(heads))
    batch = tiny_batch()
    batch["global"][1] *= 3              # sample 1 attends more sharply: the batch-global threshold matters
    model.begin_step(0)
    loss, logs = model(batch)
    _, batch_masks = model.teach(batch["global"][:, 0], torch.tensor(heads))
    model.cfg.mask_threshold = "image"
    _, image_masks = model.teach(batch["global"][:, 0], torch.tensor(heads))
    model.cfg.mask_threshold = "batch"
    assert not torch.equal(batch_masks, image_masks)                   # so the comparison below sees D4

    clip, local = batch["global"][:, 0], batch["local"]
    T, L, B = clip.shape[1], local.shape[1], clip.shape[0]
    with torch.no_grad():
        outs = [model.teacher.net.forward_features(clip[:, f], return_attention=True, return_keys=True,
                                                   return_queries=True) for f in range(T)]
        teacher_global = torch.stack([model.teacher_head(o["cls"]) for o in outs])
        masked = reference_mot(torch.stack([o["attention"] for o in outs]), torch.stack([o["queries"] for o in outs]),
                               torch.stack([o["keys"] for o in outs]), torch.stack([o["patches"] for o in outs]),
                               16, clip, heads)
        student = lambda x: model.student_head(model.student(x))    # noqa: E731
        student_global = [torch.stack([student(masked[i][:, f]) for f in range(T)]) for i in range(3)]
        student_local = torch.stack([student(torch.cat([local[:, v, f] for v in range(L)])) for f in range(T)])
        reference = ReferenceDINOLoss(64, L, 0.04)
        expected = reference(student_local, student_global, teacher_global)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    torch.testing.assert_close(model.center, reference.center, rtol=1e-10, atol=1e-12)
    assert 0 < logs["mask_fraction"] < 1


def test_gradients_reach_only_the_student():
    torch.manual_seed(6)
    model = tiny_dora()
    model.begin_step(0)
    loss, _ = model(tiny_batch())
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in [*model.teacher.parameters(),
                                                                *model.teacher_head.parameters()])
    student = [p for p in [*model.student.parameters(), *model.student_head.parameters()] if p.requires_grad]
    assert all(p.grad is not None for p in student)
    assert sum(p.grad.abs().sum() for p in student) > 0


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(7)
    model = tiny_dora(head_choice="first", momentum_teacher=0.9)
    batch = tiny_batch(1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(12):
        model.begin_step(step)
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step(step)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_objects_are_limited_by_the_heads_and_locals_by_the_skip():
    with pytest.raises(ValueError, match="has only 3 attention heads"):
        tiny_dora(objects=4)
    with pytest.raises(ValueError, match="at least one local crop"):
        DoRAConfig(local_crops=1, skip_local_crop0=True)


def test_views_are_the_reference_recipe():
    views = DoRA(DoRAConfig(out_dim=64), arch="vit_tiny_patch16", total_steps=10, steps_per_epoch=1).views()
    assert (views.family, views.frames, views.stride, views.global_crops, views.local_crops) == ("multicrop", 8, 20, 1, 6)
    assert (views.global_size, views.local_size, views.scale) == (224, 112, (0.2, 1.0))
    assert views.per_frame_color and views.per_frame_local_boxes and views.global_blur == (0.1, 0.1)
