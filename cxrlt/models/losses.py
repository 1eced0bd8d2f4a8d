"""Multi-label losses for long-tailed label distributions.

Every loss takes raw logits z (B, C) and 0/1 targets y (B, C) and returns one scalar: the
MEAN over all B*C elements of the per-element loss (also for ASL, whose paper sums over
classes; ours is the paper's value divided by C, which only rescales the gradient).
Each loss is written as a positive term (counted where y=1) plus a negative term (y=0),
built from logsigmoid/softplus so that large |z| never overflows; all maths is done in fp32
(bf16 logits from autocast are upcast).

Names (cfg["loss"] or the `name` argument of build_loss):
  bce     binary cross-entropy with logits
  bce_pw  BCE, positive term of label j weighted by (N - n_j) / n_j, clipped to [1e-3, 1000]
          (a label seen in k of N images then weighs like the other N - k, up to a 1000x cap
          so a label with 1-2 positives cannot dominate the gradient)
  focal   binary focal loss (Lin et al. 2017), gamma = cfg focal_gamma, no alpha
  asl     asymmetric loss (Ridnik et al. 2021): positives (1-p)^g+ * -log p; negatives use the
          shifted probability p_m = max(p - clip, 0): p_m^g- * -log(1 - p_m)
  cb      class-balanced BCE (Cui et al. 2019): both terms of label j weighted by the
          effective-number weight w_j = (1-beta)/(1-beta^n_j), normalised to mean 1
  ldam    multi-label LDAM (Cao et al. 2019) on real logits z = s * r (the model's head
          multiplies its raw scores r by s = cfg ldam_s itself, see models.py):
          loss = BCE(z - y * s * m_j, y), i.e. BCE(s * (r - y * m_j), y), with margins
          m_j ~ n_j^(-1/4), the rarest label's m = cfg ldam_max_m (applied in logit units)
  db      distribution-balanced loss (Wu et al. 2020), see DBLoss
  margin_bce  the CXR-LT 2026 winner's released loss (github hieuphamha19/CXR_LT, named "DB" there
          but neither DB's re-balancing nor its negative-tolerant term): BCE(z - y * m_j, y) with
          a positive margin m_j that is LARGER for frequent labels, m_j = max_m * (u_j - u_min) /
          (u_max - u_min), u_j = 1 / w_j, and both terms of label j weighted by w_j^power, w_j the
          effective-number weight (beta = cfg cb_beta, mean 1); max_m = cfg margin_bce_max_m,
          power = cfg margin_bce_power (released: 0.2 and 0.5, beta 0.9999)

DRW (deferred re-weighting, Cao et al. 2019) is generic: when cfg drw_epoch >= 0 the positive
terms of every loss without its own class weighting (bce, focal, asl, ldam) are multiplied by
effective-number weights (beta = cfg drw_beta, mean 1 over labels) from set_epoch(drw_epoch)
on; before that the weights are 1. Negative terms always keep weight 1. cb, bce_pw and db
already re-weight by class, so combining them with DRW is refused (ConfigError).

Label counts come from the TRAINING fold. A label with no positive there must not distort the
others: LDAM margins and effective-number weights (CB, DRW) are normalised over the labels that
have a positive; a label without one gets the neutral weight 1 and the largest margin max_m (it
has no positive term the margin could act on). Per-label quantities (DB's prior, BCE pos_weight)
clamp its count to 1 so that nothing becomes inf/NaN.

Label masks. forward(logits, targets, mask=None) takes an optional (B, C) annotation mask (1 =
annotated). A masked entry (mask 0, or a NaN target when the loss was built with nan_mask) adds
nothing to the loss and gets zero gradient; the loss is then the mean over the ANNOTATED entries
(the plain mean when every entry is annotated). The counts a loss is built from are then counted
over annotated images only: build_loss's num_samples may be a (C,) array of annotated images
per label (cxrlt.data.labelmask.annotated_counts).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrlt.core.config import check_registry
from cxrlt.core.errors import ConfigError

# losses whose own definition already weights each label by its frequency
_CLASS_WEIGHTED = {"bce_pw", "cb", "db", "margin_bce"}
BCE_PW_MAX = 1000.0
BCE_PW_MIN = 1e-3


def _checked_counts(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D array, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("class_counts must be finite and >= 0")
    return counts


def _clamped_counts(counts) -> np.ndarray:
    return np.maximum(_checked_counts(counts), 1.0)


def effective_number_weights(counts, beta: float) -> np.ndarray:
    """w_j = (1 - beta) / (1 - beta^n_j) (inverse effective number), normalised to mean 1.

    The mean is taken over the labels with a positive; a label without one gets weight 1 (see
    the module docstring). beta = 0 gives uniform weights; beta -> 1 tends to 1/n_j (used exactly
    when beta >= 1).
    """
    counts = _checked_counts(counts)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"effective-number beta must be in [0, 1], got {beta}")
    seen = counts > 0
    out = np.ones_like(counts)
    if seen.any():
        out[seen] = _effective_number(counts[seen], beta)
    return out


def _effective_number(n: np.ndarray, beta: float) -> np.ndarray:
    if beta >= 1.0:
        w = 1.0 / n
    elif beta == 0.0:
        w = np.ones_like(n)
    else:
        # 1 - beta^n computed as -expm1(n log beta): exact even when beta^n is close to 1
        w = (1.0 - beta) / -np.expm1(n * np.log(beta))
    return w / w.mean()


def annotation_mask(y: torch.Tensor, mask: torch.Tensor | None = None,
                    nan_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (targets with every unannotated entry set to 0, float mask (1 = annotated) or None).

    mask: an explicit (B, C) mask; nan_mask: NaN targets are unannotated too. None when neither
    applies (no extra work on the unmasked path)."""
    m = None
    if mask is not None:
        if mask.shape != y.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the targets' shape {tuple(y.shape)}")
        m = mask.to(device=y.device, dtype=torch.float32)
    if nan_mask:
        known = (~torch.isnan(y)).float()
        m = known if m is None else m * known
    if m is None:
        return y, None
    return torch.where(m > 0, torch.nan_to_num(y, nan=0.0), torch.zeros_like(y)), m


def masked_mean(elements: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of the per-element loss over the annotated entries (0 when none is). Multiplying
    by the mask (not indexing) keeps shapes static and gives masked entries exactly zero gradient."""
    return (elements * m).sum() / m.sum().clamp_min(1.0)


class LossBase(nn.Module):
    """Base of all losses: mean over elements of pos_weight * positive term + negative term.

    Subclasses implement `terms(z, y) -> (pos, neg)`, both (B, C), already multiplied by y
    and (1 - y). z are real logits (sigmoid(z) is the probability) for every loss.
    """

    def __init__(self):
        super().__init__()
        self.drw_epoch = -1
        self.nan_mask = False  # NaN targets are unannotated entries (set by build_loss)
        self.register_buffer("drw_weights", None, persistent=False)
        self.register_buffer("active_pos_weight", None, persistent=False)

    def enable_drw(self, counts, drw_epoch: int, beta: float) -> None:
        """Weight positive terms by effective-number weights from epoch `drw_epoch` on."""
        self.drw_epoch = int(drw_epoch)
        self.drw_weights = torch.tensor(effective_number_weights(counts, beta), dtype=torch.float32)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """The one call through which the loss learns the (0-based) epoch."""
        on = self.drw_weights is not None and self.drw_epoch >= 0 and epoch >= self.drw_epoch
        self.active_pos_weight = self.drw_weights if on else None

    def terms(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape != targets.shape or logits.dim() != 2:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be (B, C)")
        z = logits.float()
        y = targets.to(device=z.device, dtype=torch.float32)
        y, m = annotation_mask(y, mask, self.nan_mask)
        pos, neg = self.terms(z, y)
        if self.active_pos_weight is not None:
            pos = pos * self.active_pos_weight.to(z.device)
        if m is None:
            return (pos + neg).mean()
        return masked_mean(pos + neg, m)


class BCELoss(LossBase):
    """Plain BCE; with `pos_weight` (C,) the positive term of label j is scaled by it."""

    def __init__(self, pos_weight: np.ndarray | None = None):
        super().__init__()
        pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", pw, persistent=False)

    def terms(self, z, y):
        pos = y * F.softplus(-z)  # -log sigmoid(z)
        if self.pos_weight is not None:
            pos = pos * self.pos_weight.to(z.device)
        return pos, (1 - y) * F.softplus(z)  # -log(1 - sigmoid(z))


class FocalLoss(LossBase):
    """Binary focal loss: (1-p)^g * -log p for positives, p^g * -log(1-p) for negatives."""

    def __init__(self, gamma: float):
        super().__init__()
        self.gamma = float(gamma)

    def terms(self, z, y):
        # sigmoid(-z) is 1-p computed without cancellation
        pos = y * torch.sigmoid(-z).pow(self.gamma) * F.softplus(-z)
        neg = (1 - y) * torch.sigmoid(z).pow(self.gamma) * F.softplus(z)
        return pos, neg


class AsymmetricLoss(LossBase):
    """ASL: positives (1-p)^g+ * -log p; negatives p_m^g- * -log(1-p_m), p_m = max(p - clip, 0)."""

    def __init__(self, gamma_neg: float, gamma_pos: float, clip: float):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = float(gamma_neg), float(gamma_pos), float(clip)

    def terms(self, z, y):
        pos = y * torch.sigmoid(-z).pow(self.gamma_pos) * F.softplus(-z)
        if self.clip > 0:
            # 1 - p_m = min(1 - p + clip, 1) >= clip > 0: the log is finite for any z
            one_minus_pm = (torch.sigmoid(-z) + self.clip).clamp(max=1.0)
            p_m = 1.0 - one_minus_pm
            neg_log = -torch.log(one_minus_pm)
        else:
            p_m, neg_log = torch.sigmoid(z), F.softplus(z)
        neg = (1 - y) * p_m.pow(self.gamma_neg) * neg_log
        return pos, neg


class ClassBalancedLoss(BCELoss):
    """BCE with both terms of label j weighted by its effective-number weight (mean 1)."""

    def __init__(self, counts, beta: float):
        super().__init__()
        self.register_buffer(
            "class_weight", torch.tensor(effective_number_weights(counts, beta), dtype=torch.float32),
            persistent=False,
        )

    def terms(self, z, y):
        pos, neg = super().terms(z, y)
        w = self.class_weight.to(z.device)
        return pos * w, neg * w


def ldam_margins(counts, max_m: float) -> np.ndarray:
    """m_j = max_m * (n_min / n_j)^(1/4): proportional to n_j^(-1/4), the rarest label with a
    positive gets max_m (n_min over labels with a positive; a label without one gets max_m)."""
    n = _checked_counts(counts)
    seen = n > 0
    m = np.full_like(n, float(max_m))
    if seen.any():
        m[seen] = max_m * (n[seen].min() / n[seen]) ** 0.25
    return m


class LDAMLoss(LossBase):
    """Multi-label LDAM on real logits z (= s * raw scores): BCE(z - y * s * m_j, y)."""

    def __init__(self, counts, max_m: float, s: float):
        super().__init__()
        self.s = float(s)
        # the margins of the paper are in raw-score units; the logits are s times larger
        self.register_buffer(
            "logit_margins", torch.tensor(self.s * ldam_margins(counts, max_m), dtype=torch.float32),
            persistent=False,
        )

    def terms(self, z, y):
        zs = z - y * self.logit_margins.to(z.device)
        return y * F.softplus(-zs), (1 - y) * F.softplus(zs)


class DBLoss(LossBase):
    """Distribution-balanced loss (Wu et al., ECCV 2020), as used here:

    Re-balanced weighting (paper Sec. 3.2): for image i and label j,
        r_ij = P^C_j / P^I_i,  P^C_j = (1/C)(1/n_j),  P^I_i = (1/C) sum_{k: y_ik=1} 1/n_k
    (the ratio of the label's class-aware sampling probability to the image's), smoothed as
        r_hat = alpha + sigmoid(beta * (r - mu))   (cfg db_alpha, db_beta, db_mu)
    and applied to BOTH terms of every label of the image. An image with no positive label is
    never drawn by class-aware sampling (P^I = 0, r -> inf), so it gets the limit
    r_hat = alpha + 1 (no NaN from 0/0).
    Negative-tolerant regularisation (Sec. 3.3): with the class prior p_j = n_j/N and
    b_j = -log(1/p_j - 1) (= logit p_j, negative for a rare label), the logit is shifted to
        z' = z + kappa * b_j      (kappa = cfg db_init_bias)
    positive term log(1 + exp(-z')), negative term (1/lambda) log(1 + exp(lambda z'))
    (lambda = cfg db_neg_scale). Sign: the shift LOWERS a rare label's effective logit, so its
    negatives are already near zero loss and stop suppressing it, which is the point of the
    regulariser (this is also the sign of the authors' released code, which adds the bias).
    We use one shift for both terms, as in the paper's formula. Mapping to the released code
    (github wutong16/DistributionBalancedLoss, ResampleLoss): it computes the shift as
    -log(1/p - 1) * init_bias / neg_scale, i.e. divides kappa by lambda; ours does not, so its
    (init_bias, neg_scale) = (0.05, 2.0) is our (db_init_bias, db_neg_scale) = (0.025, 2.0):
    db_init_bias = released init_bias / neg_scale.
    Optional focal modulation (cfg db_focal_gamma > 0): each term is multiplied by (1 - p_t)^g
    with p_t = sigmoid(z') for positives and sigmoid(-lambda z') for negatives. The constant
    "balance" factor of the released code is left out (it only rescales the loss).
    """

    def __init__(self, counts, num_samples: int, alpha: float, beta: float, mu: float,
                 neg_scale: float, kappa: float, focal_gamma: float):
        super().__init__()
        n = _clamped_counts(counts)
        N = np.maximum(np.asarray(num_samples, dtype=np.float64), 1.0)  # an int, or annotated images per label
        if neg_scale <= 0:
            raise ConfigError(f"db_neg_scale must be > 0, got {neg_scale}")
        self.alpha, self.beta, self.mu = float(alpha), float(beta), float(mu)
        self.neg_scale, self.focal_gamma = float(neg_scale), float(focal_gamma)
        # prior clipped inside (0, 1) so that a label present in (almost) every image stays finite
        p = np.clip(n / N, 0.5 / N, 1 - 0.5 / N)
        shift = kappa * np.log(p / (1 - p))
        self.register_buffer("inv_freq", torch.tensor(1.0 / n, dtype=torch.float32), persistent=False)
        self.register_buffer("logit_shift", torch.tensor(shift, dtype=torch.float32), persistent=False)

    def rebalance_weights(self, y: torch.Tensor) -> torch.Tensor:
        inv = self.inv_freq.to(y.device)
        p_image = (y * inv).sum(dim=1, keepdim=True)  # (B, 1); the 1/C factors cancel
        has_pos = p_image > 0
        r = inv.unsqueeze(0) / torch.where(has_pos, p_image, torch.ones_like(p_image))
        r_hat = self.alpha + torch.sigmoid(self.beta * (r - self.mu))
        return torch.where(has_pos, r_hat, torch.full_like(r_hat, self.alpha + 1.0))

    def terms(self, z, y):
        w = self.rebalance_weights(y)
        zs = z + self.logit_shift.to(z.device)
        lam = self.neg_scale
        pos = y * F.softplus(-zs)
        neg = (1 - y) * F.softplus(lam * zs) / lam
        if self.focal_gamma > 0:
            pos = pos * torch.sigmoid(-zs).pow(self.focal_gamma)
            neg = neg * torch.sigmoid(lam * zs).pow(self.focal_gamma)
        return w * pos, w * neg


def margin_bce_margins(counts, beta: float, max_m: float) -> np.ndarray:
    """m_j = max_m * min-max-normalised 1 / w_j (w: effective-number weights): max_m for the most
    frequent label, 0 for the rarest, over the labels with a positive (a label without one gets
    0: it has no positive term). All labels equally frequent: 0 everywhere."""
    n = _checked_counts(counts)
    seen = n > 0
    m = np.zeros_like(n)
    if seen.sum() > 1:
        u = 1.0 / effective_number_weights(n, beta)[seen]
        span = u.max() - u.min()
        if span > 0:
            m[seen] = max_m * (u - u.min()) / span
    return m


class MarginBCELoss(LossBase):
    """BCE(z - y * m_j, y), both terms weighted by w_j^power (module docstring: margin_bce)."""

    def __init__(self, counts, beta: float, max_m: float, power: float):
        super().__init__()
        w = effective_number_weights(counts, beta) ** float(power)
        self.register_buffer("margins", torch.tensor(margin_bce_margins(counts, beta, max_m), dtype=torch.float32),
                             persistent=False)
        self.register_buffer("class_weight", torch.tensor(w, dtype=torch.float32), persistent=False)

    def terms(self, z, y):
        zs = z - y * self.margins.to(z.device)
        w = self.class_weight.to(z.device)
        return w * y * F.softplus(-zs), w * (1 - y) * F.softplus(zs)


def bce_pos_weights(counts, num_samples: int) -> np.ndarray:
    """(N - n_j) / n_j with both counts clamped to >= 1, clipped to [BCE_PW_MIN, BCE_PW_MAX]."""
    n = _clamped_counts(counts)
    negatives = np.maximum(np.asarray(num_samples, dtype=np.float64) - n, 1.0)  # N: an int or (C,) annotated
    return np.clip(negatives / n, BCE_PW_MIN, BCE_PW_MAX)


# cfg loss -> (cfg, positive counts per label, training images) -> the loss; its names are
# config.LOSS_NAMES
LOSSES = {
    "bce": lambda cfg, counts, n: BCELoss(),
    "bce_pw": lambda cfg, counts, n: BCELoss(pos_weight=bce_pos_weights(counts, n)),
    "focal": lambda cfg, counts, n: FocalLoss(cfg["focal_gamma"]),
    "asl": lambda cfg, counts, n: AsymmetricLoss(cfg["asl_gamma_neg"], cfg["asl_gamma_pos"], cfg["asl_clip"]),
    "cb": lambda cfg, counts, n: ClassBalancedLoss(counts, cfg["cb_beta"]),
    "ldam": lambda cfg, counts, n: LDAMLoss(counts, cfg["ldam_max_m"], cfg["ldam_s"]),
    "db": lambda cfg, counts, n: DBLoss(counts, n, cfg["db_alpha"], cfg["db_beta"], cfg["db_mu"], cfg["db_neg_scale"],
                                        cfg["db_init_bias"], cfg["db_focal_gamma"]),
    "margin_bce": lambda cfg, counts, n: MarginBCELoss(counts, cfg["cb_beta"], cfg["margin_bce_max_m"],
                                                       cfg["margin_bce_power"]),
}
check_registry("loss", LOSSES)


def build_loss(cfg: dict, class_counts: np.ndarray, num_samples, name: str | None = None,
               nan_mask: bool = False) -> LossBase:
    """The loss named `name` (default cfg["loss"]), parameterised by the training-fold counts.

    class_counts: positives per label in the training fold (C,); num_samples: training images
    (int), or annotated training images per label ((C,) array: labelmask.annotated_counts). nan_mask: NaN
    targets are unannotated entries (masked out of the loss).
    DRW is enabled from cfg drw_epoch (>= 0) with cfg drw_beta; call loss.set_epoch(e) each epoch.
    """
    name = cfg["loss"] if name is None else name
    if name not in LOSSES:
        raise ConfigError(f"unknown loss '{name}' (choose one of: {', '.join(LOSSES)})")
    counts = _checked_counts(class_counts)
    loss = LOSSES[name](cfg, counts, num_samples)
    loss.nan_mask = bool(nan_mask)
    drw_epoch = int(cfg.get("drw_epoch", -1))
    if drw_epoch >= 0:
        if name in _CLASS_WEIGHTED:
            raise ConfigError(
                f"loss '{name}' already weights labels by frequency; deferred re-weighting "
                f"(drw_epoch={drw_epoch}) would weight them twice: set drw_epoch -1"
            )
        loss.enable_drw(counts, drw_epoch, cfg["drw_beta"])
    return loss
