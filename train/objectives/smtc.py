"""SMTC: semantics meets temporal correspondence (Qian et al., ICCV 2023), two-stage slot attention.

Every frame of a clip is read by a ViT whose last-block keys, plus a projection of their correlation
with the neighbouring frame's keys, feed semantic slots (softmax over slots) and, inside each, P
instance slots (softmax over instances, gated by the semantic attention) (`models.slots.SMTCSlots`).
A teacher, the same network following the student by EMA except for its encoder, which stays at its
initialisation, sees its own colour draw of the same clip. Three losses (objectives.md §3.a):

* slot diversity: the semantic masks of different slots should not overlap;
* dense-transport temporal consistency: the student's slot assignment at a position of frame i
  should predict the teacher's at the positions of frame j that an entropic OT plan between the two
  frames' teacher keys sends it to;
* instance contrast: each student instance slot should match (Hungarian) one teacher instance slot of
  its semantic slot, in every pair of frames, and stay apart from the other three.

Defaults are the README's efficient recipe; flags that switch between the paper and the code are
listed in docs/objectives.md (smtc.instance_gate, correlation_wrap, teacher_encoder_ema, ...).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import models
from models.slots import SlotAttention, SMTCSlots, semantic_instance_cosine
from pipeline import ClipViews
from train.objectives.base import Objective
from train.sinkhorn import sinkhorn_transport_plan
from train.teacher import EMATeacher

# log(0) guard of the student's slot assignment and the offset of the diversity masks (the reference's).
LOG_EPS = 1e-8
# Denominator guard of the instance loss, added per instance before summing (the reference's).
VALID_EPS = 1e-10
# Largest instance count matched by enumerating permutations on the device (6! = 720 per problem);
# above it, scipy's Hungarian solver runs on the CPU.
MAX_ENUMERATED_INSTANCES = 6


def frame_pairs(frames: int, same: bool, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered frame pairs (i, j), i outer and j inner, with or without i == j."""
    pairs = [(i, j) for i in range(frames) for j in range(frames) if same or i != j]
    index = torch.tensor(pairs, device=device).T
    return index[0], index[1]


def slot_diversity_loss(semantic_logits: torch.Tensor) -> torch.Tensor:
    """Mean cosine between different slots' masks: (..., S, N) logits -> scalar (1 for constant logits)."""
    masks = F.normalize(semantic_logits.softmax(dim=-2) + LOG_EPS, dim=-1)
    gram = masks @ masks.transpose(-1, -2)                                   # (..., S, S)
    off_diagonal = ~torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    return gram[..., off_diagonal].mean()


@torch.no_grad()
def transport_plans(keys: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """OT plans between every ordered pair of different frames of the (teacher) keys.

    keys: (B, T, N, C). Returns (B, T(T-1), N, N): the plan from frame i's positions (rows) to frame
    j's (columns) for the cost 1 - cosine, with marginals the L1 norms of the L2-normalised keys.
    """
    batch, frames = keys.shape[:2]
    unit = F.normalize(keys, dim=-1)
    i, j = frame_pairs(frames, same=False, device=keys.device)
    source, target = unit[:, i].flatten(0, 1), unit[:, j].flatten(0, 1)     # (B*P, N, C)
    cost = 1 - source @ target.transpose(1, 2)
    plan = sinkhorn_transport_plan(cost, source.abs().sum(-1), target.abs().sum(-1), epsilon, iterations)
    return plan.unflatten(0, (batch, -1))


def dense_transport_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, plans: torch.Tensor
                         ) -> torch.Tensor:
    """Cross-entropy of the student's slot assignment in frame i against the teacher's in frame j,
    weighted by the transport plan between their positions; mean over pairs and batch.

    student_logits, teacher_logits: (B, T, S, N) semantic logits. plans: (B, T(T-1), N, N) from
    :func:`transport_plans`. Each plan has unit mass, so constant logits give log S.
    """
    frames = student_logits.shape[1]
    i, j = frame_pairs(frames, same=False, device=student_logits.device)
    log_student = torch.log(student_logits.softmax(dim=2) + LOG_EPS)[:, i]  # (B, P, S, N)
    teacher = teacher_logits.softmax(dim=2)[:, j]                           # (B, P, S, M)
    # sum_{n,m} plan[n,m] sum_s teacher[s,m] log_student[s,n], without the (N, N) cross matrix
    carried = torch.einsum("bpnm,bpsm->bpsn", plans, teacher)
    return -(carried * log_student).sum((-1, -2)).mean()


@torch.no_grad()
def valid_instances(semantic_logits: torch.Tensor, semantic_slots: torch.Tensor, instance_slots: torch.Tensor,
                    mask_threshold: float = 0.3, min_area: float = 0.2, min_similarity: float = 0.5
                    ) -> torch.Tensor:
    """(..., S, P) 0/1 mask of instances that count: the instance slot is close to its semantic slot
    (cosine > min_similarity) and the semantic slot's mask (softmax over slots > mask_threshold)
    covers more than min_area of the frame. Raw slots, not mlp_slot outputs; no gradient."""
    area = (semantic_logits.softmax(dim=-2) > mask_threshold).to(semantic_logits.dtype).mean(-1)
    cosine = semantic_instance_cosine(semantic_slots, instance_slots)
    return ((cosine > min_similarity) & (area > min_area)[..., None]).to(semantic_logits.dtype)


@torch.no_grad()
def match_instances(similarity: torch.Tensor) -> torch.Tensor:
    """Hungarian matching of every (..., P, P) similarity matrix: (..., P) column matched to each row,
    maximising the total similarity (minimising sum of 1 - similarity, as SMTC's scipy call).

    Small P (SMTC: 4, 24 permutations) is solved exactly on the device by scoring every permutation.
    """
    rows = similarity.shape[-1]
    if rows > MAX_ENUMERATED_INSTANCES:
        flat = (1 - similarity).reshape(-1, rows, rows).double().cpu().numpy()
        cols = [linear_sum_assignment(cost)[1] for cost in flat]
        return torch.as_tensor(cols, device=similarity.device).view(similarity.shape[:-1])
    perms = torch.tensor(list(itertools.permutations(range(rows))), device=similarity.device)  # (K, P)
    scores = similarity[..., torch.arange(rows, device=similarity.device), perms].sum(-1)      # (..., K)
    return perms[scores.argmax(-1)]


def instance_contrast_loss(valid_student: torch.Tensor, valid_teacher: torch.Tensor, objects_student: torch.Tensor,
                           objects_teacher: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """Matched-instance contrast over every frame pair (i, j), i == j included.

    valid_*: (B, T, S, P) from :func:`valid_instances`. objects_*: (B, T, S, P, C) unit vectors.
    A valid student instance p of frame i is pulled to its Hungarian match q* among the teacher's
    instances of the same slot in frame j (if that one is valid) and pushed below ``margin`` from the
    other P - 1. Sum over everything divided by the valid student instances over all pairs.
    """
    frames, instances = objects_student.shape[1], objects_student.shape[3]
    i, j = frame_pairs(frames, same=True, device=objects_student.device)
    similarity = torch.einsum("bxspc,bxsqc->bxspq", objects_student[:, i], objects_teacher[:, j])
    match = match_instances(similarity.detach())                               # (B, P2, S, P)
    positive = similarity.gather(-1, match[..., None]).squeeze(-1)
    is_negative = torch.ones_like(similarity, dtype=torch.bool).scatter_(-1, match[..., None], False)
    negative = (F.relu(similarity - margin) * is_negative).sum(-1) / (instances - 1)
    student_valid = valid_student[:, i]
    teacher_valid = valid_teacher[:, j].gather(-1, match)
    terms = student_valid * (negative - teacher_valid * positive)
    return terms.sum() / (student_valid + VALID_EPS).sum()


@dataclass
class SMTCConfig:
    """Knobs of SMTC (defaults: shvdiwnkozbw/SMTC start_twostage.sh, the README's efficient version)."""

    num_slots: int = 16
    """Semantic slots S."""
    num_instances: int = 4
    """Instance slots P per semantic slot."""
    slot_iters: int = 3
    """Slot-attention iterations per stage (the reference evaluates discovery with 5)."""
    instance_gate: Literal["hard", "softmax"] = "hard"
    """Stage-2 gating: hard = 1[semantic logit > gate_threshold] (HEAD code); softmax = weighted by
    the stage-1 softmax over slots (first code release)."""
    gate_threshold: float = 0.3
    """Semantic-logit threshold of the hard gate (on q.k / sqrt(D) logits; scale-dependent, S1)."""
    reparameterize: bool = False
    """False: instance slots are a torch.normal draw around slots_mu with no gradient (the code;
    slots_sigma never trains, S2); True: mu + exp(sigma) * eps, so both train."""
    correlation_wrap: bool = False
    """True: frame 0's keys are correlated with the clip's last frame (the code's torch.roll, S4);
    False: with frame 1 (every other frame with the one before)."""
    teacher_momentum: float = 0.999
    """EMA momentum of the teacher (constant)."""
    teacher_encoder_ema: bool = False
    """False: the teacher's encoder stays at its initialisation (the efficient code, S3); True: it
    follows the student's by EMA like the rest of the teacher."""
    transport_epsilon: float = 0.05
    """Entropic temperature of the dense-transport OT plan."""
    transport_iterations: int = 3
    """Sinkhorn scaling rounds of the OT plan."""
    diversity_scale: float = 1.0
    """Weight of the slot-diversity loss (the reference's ent_scale)."""
    consistency_scale: float = 1.0
    """Weight of the dense-transport loss (the reference's cons_scale)."""
    valid_mask_threshold: float = 0.3
    """Softmax-over-slots level a position needs to count in a slot's area (0.5 in the first release)."""
    valid_min_area: float = 0.2
    """Area fraction a semantic slot needs for its instances to count."""
    valid_min_similarity: float = 0.5
    """Cosine an instance slot needs with its semantic slot to count."""
    negative_margin: float = 0.5
    """Similarity above which unmatched instances are pushed apart."""
    clip_len: int = 4
    """Frames per clip T."""
    frame_stride: int = 4
    """Gap between the clip's frames, in packed frames (the reference: 4 YouTube-VOS frames at 6 fps)."""
    size: int = 256
    """Side of the square frames (the reference resizes whole frames to 256 x 256)."""
    crop_scale: tuple[float, float] = (1.0, 1.0)
    """Area range of the clip crop; (1, 1) with a wide crop_ratio is the whole frame, squashed to
    size x size like the reference's cv2.resize."""
    crop_ratio: tuple[float, float] = (0.25, 4.0)
    """Aspect-ratio range of the clip crop."""
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """Colour-jitter strengths (brightness, contrast, saturation, hue), p 0.8; grayscale p 0.2, blur p 0.5."""

    def __post_init__(self) -> None:
        if self.num_instances < 2 or self.num_slots < 2 or self.clip_len < 2 or self.slot_iters < 1:
            raise ValueError("smtc.num_instances, num_slots and clip_len must be >= 2 and slot_iters >= 1")


class SMTC(Objective):
    """Student SMTC network against a teacher copy (EMA except its encoder) on two colourings of a clip."""

    Config = SMTCConfig
    default_arch = "vit_small_patch16"
    find_unused_parameters = True  # slots_sigma gets no gradient (reparameterize False)

    def __init__(self, cfg: SMTCConfig, arch: str, drop_path: float = 0.1, *,
                 total_steps: int, steps_per_epoch: int) -> None:
        super().__init__()  # constant momentum and no schedules: the two counts go unused
        if not arch.startswith("vit"):
            raise ValueError(f"model.arch={arch}: SMTC reads a ViT's last-block keys; use a vit_* model")
        self.cfg, self.arch = cfg, arch
        # dense_norm False: SMTC evaluates the last block's tokens without the final norm (§3.e)
        self.student = self.build_network(models.build(arch, drop_path=drop_path, dense_norm=False))
        frozen = () if cfg.teacher_encoder_ema else ("encoder.",)
        twin = self.build_network(models.build(arch, drop_path=0.0, dense_norm=False))
        self.teacher = EMATeacher(self.student, twin=twin, frozen=frozen)

    def build_network(self, encoder: nn.Module) -> SMTCSlots:
        c = self.cfg
        if c.size % encoder.patch_size:
            raise ValueError(f"smtc.size={c.size} is not a multiple of the patch size {encoder.patch_size}")
        side = c.size // encoder.patch_size
        slots = SlotAttention(c.num_slots, encoder.embed_dim, c.num_instances, c.slot_iters, encoder.embed_dim,
                              instance_gate=c.gate_threshold, reparameterize=c.reparameterize, gate=c.instance_gate)
        return SMTCSlots(encoder, (side, side), slots, correlation_wrap=c.correlation_wrap)

    def views(self) -> ClipViews:
        c = self.cfg
        return ClipViews(frames=c.clip_len, stride=c.frame_stride, size=c.size, scale=c.crop_scale,
                        ratio=c.crop_ratio, flip=False, color=True, jitter=c.jitter, color_draws=2)

    def losses(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The three loss terms from the two networks' outputs (``SMTCSlots.forward`` dicts)."""
        c = self.cfg
        plans = transport_plans(teacher["keys"], c.transport_epsilon, c.transport_iterations)
        valid = [valid_instances(out["semantic_logits"], out["semantic_slots"], out["instance_slots"],
                                 c.valid_mask_threshold, c.valid_min_area, c.valid_min_similarity)
                 for out in (student, teacher)]
        return {
            "diversity": slot_diversity_loss(student["semantic_logits"]),
            "consistency": dense_transport_loss(student["semantic_logits"], teacher["semantic_logits"], plans),
            "instance": instance_contrast_loss(*valid, student["objects"], teacher["objects"], c.negative_margin),
            "valid_fraction": valid[0].mean(),
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clip = batch["clip"]                                    # (B, 2, T, 3, S, S): student, teacher colourings
        student = self.student(clip[:, 0])
        with torch.no_grad():
            teacher = self.teacher(clip[:, 1])
        # Softmaxes, logs and the OT's exp(-cost / 0.05) in float32 whatever the autocast
        with torch.autocast(clip.device.type, enabled=False):
            wide = [{k: v.to(torch.promote_types(v.dtype, torch.float32)) for k, v in out.items()}
                    for out in (student, teacher)]
            terms = self.losses(*wide)
        loss = (self.cfg.diversity_scale * terms["diversity"] + self.cfg.consistency_scale * terms["consistency"]
                + terms["instance"])
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.teacher.update(self.student, self.cfg.teacher_momentum)

    def backbone(self) -> nn.Module:
        return self.student.encoder  # the reference evaluates the student's encoder

    def export_heads(self) -> dict[str, tuple[nn.Module, dict]]:
        # The student's slots run on the exported student encoder; discovery reads them in windows of a clip
        return {"slots": (self.student.head(), {**self.student.settings(), "clip_len": self.cfg.clip_len})}

    def student_backbone(self) -> nn.Module:
        return self.student.encoder

    def teacher_pairs(self) -> list[tuple[EMATeacher, nn.Module]]:
        return [(self.teacher, self.student)]
