"""The classifier: a timm backbone and one of three multi-label heads.

    logits = model(model.normalize(x_uint8))
    model(x) = head.classify(head.pool(model.features(x)))

`features(x)` is the backbone's spatial feature map (B, F, h, w): timm's forward_features
followed by its forward_head(pre_logits=True) with global pooling off, so that layers timm
keeps in the head before pooling (e.g. ConvNeXt's pretrained head LayerNorm, applied per
location here) are kept. NHWC maps (Swin, MambaOut) are permuted to NCHW; token outputs
(ViT) lose their prefix tokens and become a (B, F, 1, n_tokens) map.

Logits are real logits: `model(x)` and `head.classify(h)` return the values whose sigmoid is
the probability, whatever the loss. The head holds `logit_scale` (a constant, not trained):
LDAM's s when cfg loss is ldam (its raw scores live in a small range, e.g. a cosine head's
[-1, 1], and s stretches them), else 1. So no consumer of a model ever multiplies by a scale.

Heads (cfg["head"]):
  linear  global average pool -> (B, F) -> linear layer
  cosine  global average pool -> cosine similarity with each class weight, times
          cfg cosine_scale (scores in [-scale, scale]; use with LDAM, whose s scales them)
  csra    class-specific residual attention (Zhu & Wu, ICCV 2021): per-location class scores
          s = W f (B, C, h*w) from a 1x1 conv, divided by ||w_c|| per class when cfg csra_normalize
          (as the official code, github Kevinz-code/CSRA; false: the raw scores of older runs, whose
          effective temperature T*||w_c|| drifts as the weights grow); logits = mean_loc(s) +
          lambda * sum_loc(a * s) with a = softmax over locations of T*s (T = cfg csra_temperature;
          T >= 99 means max pooling, the T -> inf limit), lambda = cfg csra_lambda; plus a per-class
          bias (not in the paper; it lets the head learn label priors like the linear head).
  bn_attention  the CXR-LT 2026 winner's head (github hieuphamha19/CXR_LT, train_csra_head.py):
          x = BatchNorm2d(map); logits = fc(mean_loc x) + lambda * (fc.weight . (sum_loc a_c x) + fc.bias)
          with a_c = softmax over locations of a 1x1 conv's class maps (no temperature), the attended
          features scored by the same linear layer; lambda = cfg csra_lambda (0.1 there).
  ml_decoder  ML-Decoder (Ridnik et al., WACV 2023; github Alibaba-MIIL/ML_Decoder): the map's
          locations are tokens, embedded by a linear layer + ReLU to cfg mld_dim; cfg mld_queries
          fixed random queries (not trained; capped at the label count) attend to them through cfg
          mld_layers decoder layers (no self-attention: cross-attention, 8 heads, feed-forward 2048,
          dropout 0.1, post-norm); a group fully-connected layer gives each query ceil(C / Q) labels.
  seed_linear  the reference paper's head (github Nikhil-Rao20/Long_Tail, models/convnext.py):
          global average pool -> LayerNorm -> Dropout(cfg seed_dropout) -> linear with bias; with
          loss ldam the head's logit_scale is s, which is the paper's s inside the loss (its
          BCE(s (z - y m)) on raw scores z is our BCE on real logits s z with margins s m).
pool() is the identity for the map heads (csra, bn_attention, ml_decoder), which need the map.

Weights: cfg pretrained + pretrained_file loads a local timm weight file (no network);
pretrained without a file uses timm's hub download; init_checkpoint loads one of our own
checkpoints (backbone strict; head only when its shapes and labels match, else kept random).

cfg grad_checkpointing "true": timm's set_grad_checkpointing on the backbone (the activations inside
each block are recomputed in the backward pass instead of kept: about a third more compute for
a fraction of the activation memory; the results are the same to float tolerance).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrlt.core.config import check_registry
from cxrlt.core.errors import ConfigError, InputError

CSRA_MAX_TEMPERATURE = 99.0  # csra_temperature >= this means max pooling over locations


class Head(nn.Module):
    """A head: pool(feature map) -> head input h; classify(h) -> real logits (B, C).

    Subclasses implement pool and scores (the raw class scores); classify multiplies the scores
    by `logit_scale` (1 except with LDAM, see the module docstring).
    """

    logit_scale: float = 1.0

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        # Always fp32, on fp32 inputs, also under autocast: a bf16 matmul here would round the
        # logits (and LDAM's x s would scale the rounding) to a few hundred distinct values per
        # label, which costs AP at selection and at test time.
        with torch.autocast(device_type=h.device.type, enabled=False):
            z = self.scores(h.float())
            return z if self.logit_scale == 1.0 else z * self.logit_scale

    def forward(self, feat):
        return self.classify(self.pool(feat))


class LinearHead(Head):
    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat.mean(dim=(2, 3))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()


class CosineHead(Head):
    def __init__(self, num_features: int, num_classes: int, scale: float):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, num_features))
        self.reset_parameters()

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat.mean(dim=(2, 3))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=1)  # classify runs this in fp32, also under autocast
        w = F.normalize(self.weight.float(), dim=1)
        return self.scale * (x @ w.t())

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class CSRAHead(Head):
    def __init__(self, num_features: int, num_classes: int, lam: float, temperature: float,
                 normalize: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"csra_temperature must be > 0, got {temperature}")
        self.lam, self.temperature, self.normalize = float(lam), float(temperature), bool(normalize)
        self.conv = nn.Conv2d(num_features, num_classes, kernel_size=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.reset_parameters()

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat

    def class_scores(self, feat: torch.Tensor) -> torch.Tensor:
        """Per-location class scores (B, C, h, w): the 1x1 conv, divided by ||w_c|| when normalize."""
        s = self.conv(feat)
        if self.normalize:
            s = s / self.conv.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(1, -1, 1, 1)
        return s

    def scores(self, feat: torch.Tensor) -> torch.Tensor:
        s = self.class_scores(feat).flatten(2)  # (B, C, h*w); fp32: see Head.classify
        base = s.mean(dim=2)
        if self.temperature >= CSRA_MAX_TEMPERATURE:
            att = s.amax(dim=2)
        else:
            a = torch.softmax(self.temperature * s, dim=2)
            att = (a * s).sum(dim=2)
        return base + self.lam * att + self.bias

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.zeros_(self.bias)


class BNAttentionHead(Head):
    """The CXR-LT 2026 winner's head (module doc): BatchNorm2d, then GAP + lambda x class attention."""

    def __init__(self, num_features: int, num_classes: int, lam: float):
        super().__init__()
        self.lam = float(lam)
        self.bn = nn.BatchNorm2d(num_features)
        self.fc = nn.Linear(num_features, num_classes)
        self.att = nn.Conv2d(num_features, num_classes, kernel_size=1, bias=False)
        self.reset_parameters()

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat

    def normed(self, feat: torch.Tensor) -> torch.Tensor:
        return self.bn(feat)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Class attention over locations (B, C, h*w) of the normalised map x, each row summing to 1."""
        return torch.softmax(self.att(x).flatten(2), dim=2)

    def scores(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.normed(feat)
        flat = x.flatten(2)  # (B, F, h*w)
        gap = self.fc(flat.mean(dim=2))
        attended = torch.bmm(self.attention(x), flat.transpose(1, 2))  # (B, C, F)
        att = (attended * self.fc.weight.unsqueeze(0)).sum(dim=2) + self.fc.bias
        return gap + self.lam * att

    def reset_parameters(self) -> None:
        # the winner's initialisation: xavier-uniform weights, zero bias, a fresh BatchNorm
        self.bn.reset_parameters()  # (running statistics too)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        nn.init.xavier_uniform_(self.att.weight)


MLD_HEADS, MLD_FEEDFORWARD, MLD_DROPOUT = 8, 2048, 0.1  # the official ML-Decoder's fixed settings


class MLDecoderLayer(nn.Module):
    """One ML-Decoder layer as the official TransformerDecoderLayerOptimal: no self-attention
    (q = norm1(q + dropout(q))), cross-attention to the tokens, feed-forward; post-norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, MLD_HEADS, dropout=MLD_DROPOUT, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, MLD_FEEDFORWARD), nn.ReLU(), nn.Dropout(MLD_DROPOUT),
                                nn.Linear(MLD_FEEDFORWARD, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(MLD_DROPOUT) for _ in range(3))

    def forward(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.drop1(q))
        q = self.norm2(q + self.drop2(self.cross(q, tokens, tokens, need_weights=False)[0]))
        return self.norm3(q + self.drop3(self.ff(q)))

    def reset_parameters(self) -> None:
        self.cross.out_proj.reset_parameters()  # (MultiheadAttention's own reset leaves this weight alone)
        self.cross._reset_parameters()  # in-projection, and the zero biases as at construction
        for m in (self.ff[0], self.ff[3], self.norm1, self.norm2, self.norm3):
            m.reset_parameters()


class MLDecoderHead(Head):
    """ML-Decoder (module doc). Attributes: queries (Q, D) buffer (fixed, drawn again by
    reset_parameters), group_weight (Q, D, k) and bias (C) of the group fully-connected output."""

    def __init__(self, num_features: int, num_classes: int, queries: int, layers: int, dim: int):
        super().__init__()
        if dim % MLD_HEADS:
            raise ConfigError(f"mld_dim must be a multiple of {MLD_HEADS}, got {dim}")
        self.num_classes = num_classes
        q = min(int(queries), num_classes)
        self.group = -(-num_classes // q)  # labels per query
        self.embed = nn.Linear(num_features, dim)
        self.register_buffer("queries", torch.empty(q, dim))
        self.layers = nn.ModuleList(MLDecoderLayer(dim) for _ in range(int(layers)))
        self.group_weight = nn.Parameter(torch.empty(q, dim, self.group))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.reset_parameters()

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat

    def decode(self, feat: torch.Tensor) -> torch.Tensor:
        """The queries after the decoder (B, Q, D)."""
        tokens = F.relu(self.embed(feat.flatten(2).transpose(1, 2)))  # (B, h*w, D)
        q = self.queries.unsqueeze(0).expand(len(tokens), -1, -1)
        for layer in self.layers:
            q = layer(q, tokens)
        return q

    def scores(self, feat: torch.Tensor) -> torch.Tensor:
        h = self.decode(feat)
        out = torch.einsum("bqd,qdk->bqk", h, self.group_weight).flatten(1)  # query q -> labels q*k .. q*k+k-1
        return out[:, :self.num_classes] + self.bias

    def reset_parameters(self) -> None:
        self.embed.reset_parameters()
        nn.init.normal_(self.queries)  # as the official nn.Embedding (not trained)
        for layer in self.layers:
            layer.reset_parameters()
        nn.init.xavier_normal_(self.group_weight)
        nn.init.zeros_(self.bias)


class SeedLinearHead(Head):
    """The reference paper's head (module doc): GAP -> LayerNorm -> Dropout -> linear with bias."""

    def __init__(self, num_features: int, num_classes: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(num_features)
        self.drop = nn.Dropout(float(dropout))
        self.fc = nn.Linear(num_features, num_classes)

    def pool(self, feat: torch.Tensor) -> torch.Tensor:
        return feat.mean(dim=(2, 3))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.norm(x)))

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.fc.reset_parameters()


def logit_scale_for(cfg: dict) -> float:
    """The head's logit_scale a config implies: LDAM's s with the ldam loss, else 1."""
    return float(cfg["ldam_s"]) if cfg["loss"] == "ldam" else 1.0


# cfg head -> (cfg, num_features, num_classes) -> the head; its names are config.HEAD_NAMES
HEADS = {
    "linear": lambda cfg, f, c: LinearHead(f, c),
    "cosine": lambda cfg, f, c: CosineHead(f, c, cfg["cosine_scale"]),
    "csra": lambda cfg, f, c: CSRAHead(f, c, cfg["csra_lambda"], cfg["csra_temperature"], cfg["csra_normalize"]),
    "bn_attention": lambda cfg, f, c: BNAttentionHead(f, c, cfg["csra_lambda"]),
    "ml_decoder": lambda cfg, f, c: MLDecoderHead(f, c, cfg["mld_queries"], cfg["mld_layers"], cfg["mld_dim"]),
    "seed_linear": lambda cfg, f, c: SeedLinearHead(f, c, cfg["seed_dropout"]),
}
check_registry("head", HEADS)


def build_head(cfg: dict, num_features: int, num_classes: int) -> Head:
    name = cfg["head"]
    if name not in HEADS:
        raise ConfigError(f"unknown head '{name}' (choose one of: {', '.join(HEADS)})")
    head = HEADS[name](cfg, num_features, num_classes)
    head.logit_scale = logit_scale_for(cfg)
    return head


class CXRModel(nn.Module):
    """timm backbone + head. Attributes: backbone, head, num_features, in_chans, init_info."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int, in_chans: int):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.in_chans = in_chans
        self.init_info: dict = {}
        mean, std = _pretrained_mean_std(backbone, in_chans)
        self.register_buffer("pixel_mean", mean.view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("pixel_std", std.view(1, in_chans, 1, 1), persistent=False)
        fmt = getattr(backbone, "output_fmt", "NCHW")
        self._nhwc = str(getattr(fmt, "value", fmt)).upper() == "NHWC"
        self._prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0) or 0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 1, H, W) -> float (B, in_chans, H, W) normalised for the backbone.

        Runs on x's device: /255, then (in_chans=3) the gray channel is replicated to RGB, then
        (x - mean) / std with the backbone's pretrained mean/std. in_chans=3 keeps the pretrained
        first conv exact; in_chans=1 relies on timm's weight adaptation (the RGB filters summed)
        and uses the mean of the three means and of the three stds: about the same accuracy and
        a slightly cheaper first conv. A (B, 3, H, W) input is accepted when in_chans=3.
        """
        if x.dim() != 4 or x.shape[1] not in (1, self.in_chans):
            raise ValueError(f"normalize expects (B, 1, H, W) images, got {tuple(x.shape)}")
        x = x.float() / 255.0  # not in place: a float input must not be modified
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        mean = self.pixel_mean.to(device=x.device)
        std = self.pixel_std.to(device=x.device)
        return (x - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's feature map (B, F, h, w)."""
        f = self.backbone.forward_features(x)
        f = self.backbone.forward_head(f, pre_logits=True)
        if f.dim() == 4:
            return f.permute(0, 3, 1, 2) if self._nhwc else f
        if f.dim() == 3:  # tokens (B, N, F)
            return f[:, self._prefix_tokens:].transpose(1, 2).unsqueeze(2)
        if f.dim() == 2:  # already pooled by the model
            return f[:, :, None, None]
        raise RuntimeError(f"unsupported backbone output shape {tuple(f.shape)}")

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the head classifies: pooled features (linear, cosine, seed_linear) or the map (map heads)."""
        return self.head.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classify(self.head_input(x))

    @property
    def logit_scale(self) -> float:
        """The constant the head's scores are multiplied by (LDAM's s, else 1): see the module doc."""
        return self.head.logit_scale

    @logit_scale.setter
    def logit_scale(self, value: float) -> None:
        self.head.logit_scale = float(value)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


def _pretrained_mean_std(backbone: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    pcfg = getattr(backbone, "pretrained_cfg", None) or {}
    mean = torch.tensor(pcfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
    std = torch.tensor(pcfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
    if in_chans == 1:
        return mean.mean().view(1), std.mean().view(1)
    if len(mean) != in_chans:
        raise ConfigError(f"in_chans={in_chans} but the model's pretrained mean has {len(mean)} values")
    return mean, std


def check_model_name(name: str) -> None:
    import timm

    base = name.split(".", 1)[0]
    if timm.is_model(name):
        if "." in name and name not in timm.list_pretrained(f"{base}.*"):
            # timm.is_model ignores the tag; an unknown tag only fails deep inside create_model
            tags = ", ".join(timm.list_pretrained(f"{base}.*")) or "none"
            raise ConfigError(f"config key 'model': unknown model name '{name}': no such pretrained tag "
                              f"(available: {tags})")
        return
    near = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f" (close matches: {', '.join(near)})" if near else " (see timm.list_models())"
    raise ConfigError(f"config key 'model': unknown model name '{name}'{hint}")


class _MissingKeyCatcher(logging.Handler):
    """Collects timm's 'Missing keys (...)' log line: timm loads pretrained weights with
    strict=False once the classifier is dropped, so a wrong file would otherwise load silently."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.missing: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Missing keys (") and ")" in msg:
            self.missing += [k.strip() for k in msg[len("Missing keys ("): msg.index(")")].split(",")]


def _create_backbone(cfg: dict, pretrained: bool) -> nn.Module:
    import timm

    name = cfg["model"]
    check_model_name(name)
    kwargs = dict(num_classes=0, global_pool="", in_chans=cfg["in_chans"])
    if cfg["drop_path"] > 0:  # some models (e.g. DenseNet) do not take the argument at all
        kwargs["drop_path_rate"] = cfg["drop_path"]
    file = cfg["pretrained_file"] if pretrained else ""
    if file:
        if not os.path.isfile(file):
            raise InputError(f"{file}: pretrained_file not found")
        kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(file))
    logger = logging.getLogger("timm.models._builder")
    catcher, old_level = _MissingKeyCatcher(), logger.level
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    try:
        backbone = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "drop_path_rate" in str(e):
            raise ConfigError(f"model '{name}' does not support drop_path; set drop_path 0") from None
        raise
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, AssertionError, pickle.UnpicklingError) as e:
        # a weight file for another architecture fails inside timm's key remapping or loading
        where = file or f"timm's pretrained weights for '{name}'"
        from cxrlt.models.checkpoint import load_error, needs_pickled_code

        if needs_pickled_code(e):  # the one rule for weights files (checkpoint.load_error)
            raise InputError(load_error(where, e, "pretrained_file")) from None
        raise InputError(f"{where}: could not load pretrained weights ({str(e).splitlines()[0]})") from None
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(old_level)
    if catcher.missing:
        where = file or f"timm's pretrained weights for '{name}'"
        raise InputError(
            f"{where}: does not fit model '{name}': {len(catcher.missing)} backbone weights missing "
            f"(first: {', '.join(catcher.missing[:5])})"
        )
    return backbone


def _feature_width(backbone: nn.Module) -> int:
    # head_hidden_size: width after layers timm keeps in the head (e.g. MambaOut's MLP)
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def build_model(cfg: dict, num_classes: int, labels: list[str] | None = None) -> CXRModel:
    """Backbone cfg["model"] + head cfg["head"] with `num_classes` outputs.

    Pretrained weights (cfg pretrained / pretrained_file) are skipped when cfg init_checkpoint
    is set, since that checkpoint overwrites the backbone anyway. `labels` (optional, the label
    names in output order) lets init_checkpoint refuse a head trained for other labels.
    """
    init_ckpt = cfg.get("init_checkpoint", "")
    backbone = _create_backbone(cfg, pretrained=bool(cfg["pretrained"]) and not init_ckpt)
    num_features = _feature_width(backbone)
    head = build_head(cfg, num_features, num_classes)
    model = CXRModel(backbone, head, num_features, cfg["in_chans"])
    if cfg.get("grad_checkpointing") in (True, "true"):  # "auto" is the trainer's choice (training/device.py)
        set_grad_checkpointing(model, cfg["model"])
    if init_ckpt:
        model.init_info = load_init_checkpoint(model, init_ckpt, labels)
        info = model.init_info
        print(
            f"init_checkpoint {init_ckpt}: loaded {info['backbone_keys']} backbone tensors; head "
            + ("loaded" if info["head_loaded"] else f"kept random ({info['head_reason']})"),
            flush=True,
        )
    return model


def set_grad_checkpointing(model: CXRModel, name: str) -> None:
    """timm's activation checkpointing on the backbone; ConfigError when the model has none."""
    try:
        model.backbone.set_grad_checkpointing(True)
    except (AttributeError, NotImplementedError, AssertionError):
        raise ConfigError(f"model '{name}' does not support grad_checkpointing; set it false") from None


def load_init_checkpoint(model: CXRModel, path: str, labels: list[str] | None = None) -> dict:
    """Load our checkpoint into `model`: backbone strict, head only when it fits.

    Returns {"file", "backbone_keys": int, "head_loaded": bool, "head_reason": str}.
    Raises InputError when the backbone weights do not match the model exactly.
    """
    from cxrlt.models.checkpoint import load_checkpoint, state_dict_of

    ckpt = load_checkpoint(path, ours=True)
    sd = state_dict_of(ckpt)
    bb_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    problems = _state_dict_mismatch(model.backbone.state_dict(), bb_sd)
    if problems:
        run_cfg = ckpt.get("config")
        trained = run_cfg.get("model", "?") if isinstance(run_cfg, dict) else "?"
        raise InputError(
            f"{path}: backbone weights do not fit model (checkpoint model '{trained}'): {problems}"
        )
    model.backbone.load_state_dict(bb_sd, strict=True)
    reason = _state_dict_mismatch(model.head.state_dict(), head_sd)
    ckpt_labels = ckpt.get("labels")
    if not reason and labels is not None and ckpt_labels is not None and list(ckpt_labels) != list(labels):
        reason = "checkpoint labels differ from this run's labels"
    if not reason:
        model.head.load_state_dict(head_sd, strict=True)
    return {"file": str(path), "backbone_keys": len(bb_sd), "head_loaded": not reason, "head_reason": reason}


def _state_dict_mismatch(own: dict, other: dict) -> str:
    """'' when `other` has exactly own's keys and shapes, else a short description."""
    missing = [k for k in own if k not in other]
    unexpected = [k for k in other if k not in own]
    shapes = [
        f"{k} {tuple(other[k].shape)} vs {tuple(own[k].shape)}"
        for k in own if k in other and tuple(other[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    return "; ".join(parts)
