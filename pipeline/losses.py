"""Student losses over cached teacher targets, computed in token chunks.

The student's logits are z = cap·tanh(h·Eᵀ / cap) (its own final soft-cap). Per position, with the cached
top-K set S, teacher probabilities p_S and tail mass r = 1 − Σ_S p:

  tail               −Σ_S p_i log q_i − r·log(1 − Σ_S q_i)        exact CE of the coarsened distribution
  renorm             −Σ_S (p_i / Σ_S p) log q_i                   top-K renormalised (biased, for comparison)
  sampled            −Σ_S p_i log q_i − r·Σ_j (c_j/N) log q_{u_j}  unbiased, with the cache's tail draws
  auto     (default) sampled when the cache has tail draws, else tail
  ce                 −log q_label                                 the from-scratch baseline

Reverse KL on rollouts (`--loss reverse-kl`, `reverse_kl_and_grad`): on a rollout cache's generated tokens y,
sampled from a behaviour policy μ (the student of its round, `behaviour_logprob` = log μ(y)), with the
teacher's log p_T(y) from the cache (`label_logprob`) and the student's log p_S(y) recomputed here:

  k = log p_S(y) − log p_T(y)        the per-token estimate of KL(p_S ‖ p_T) (its mean under y ~ p_S is the KL)
  w = min(p_S(y) / μ(y), C)           the importance weight, without gradient (`--is-clip` C; 0: w = 1)
  loss = mean over tokens of  sg(w·k) · log p_S(y)      (its value is reported as w·k, its gradient is)
  ∇ = w · k · ∇log p_S(y)

Why this form. For one position (its prefix fixed) ∇ Σ_x p_S(x)(log p_S(x) − log p_T(x)) =
Σ_x ∇p_S(x)·(log p_S(x) − log p_T(x)) + Σ_x p_S(x)·∇log p_S(x); the last sum is ∇Σ p_S = 0, and ∇p_S = p_S·∇log p_S,
so the true gradient is E_{y~p_S}[k(y)·∇log p_S(y)]: the score-function (REINFORCE) form with the per-token
reverse KL as the cost, which is what on-policy distillation trains (Agarwal et al. 2024, GKD; Thinking
Machines 2025: the negative per-token reverse KL as the advantage, discount 0). k is a constant of the
gradient (sg), not differentiated: its own gradient, ∇log p_S(y), has mean zero under p_S and only adds
variance. When y comes from μ ≠ p_S (the round's checkpoint, while the student has moved on),
E_μ[(p_S/μ)·k·∇log p_S] = E_{p_S}[k·∇log p_S]: the weight w = p_S/μ makes it exact again; clipping it at C
(truncated importance sampling) bounds the variance at a small bias towards μ's samples, and C = 0 drops it
(the samples taken as the student's own). The prefix's own dependence on the student (the sequence-level
term, reward-to-go) is left out, as those methods do. The value summed into the loss is w·k, the importance-
weighted estimate of the per-token reverse KL, so the logged loss is a KL in nats; the gradient is the
surrogate's. The student is at τ = 1 and the cache's teacher must be too. `alpha` (hard-label CE) does not
apply to rollout tokens; a mix's fixed-cache windows keep forward KL with the `target` above.

Pure sampling (a K = 0 cache: no top K, tail mass 1, the draws from the whole distribution) is `sampled`
with S empty: −Σ_j (c_j/N) log q_{u_j}, the RS-KD estimator; `tail` and `renorm` have nothing to hold there
and are refused (`check_target`).

Temperature: the cache holds the teacher at the τ_c it was captured with (softmax(logits / τ_c): top K, tail
mass and draws; metadata `temperature`). The loss at τ divides the student's logits by τ and scales the loss
by τ²; τ is the cache's unless set (`resolve_temperature`). The target is never re-tempered, except by
`renorm`, where it is exact: within S, p_i^(τ_c/τ) renormalised is softmax(logits / τ) restricted to S. The
tail bucket cannot be: the tempered tail Σ_{x∉S} p_x^(τ_c/τ) / Z needs the probabilities the cache dropped,
so tail and sampled targets at another τ are refused. `alpha` mixes in hard-label CE: α·KD + (1−α)·CE.

Memory: a custom autograd function walks the rows in chunks, computing each chunk's loss *and* its
gradients with respect to h and E in the forward pass (as Liger's fused linear CE does), the gradient with
respect to the logits in closed form (`loss_and_grad`), so neither the [tokens × vocab] logits nor their
gradient ever exist whole; backward only scales the stored gradients. `row_losses` states every loss plainly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from pipeline.model import float32_mm, softcap_
from pipeline.settings import setting
from schemas.tokens import BEHAVIOUR

KD_TARGETS = ("auto", "tail", "renorm", "sampled")
KINDS = ("kd", "ce", "reverse-kl")
# What `reverse_kl_and_grad` adds to a `stats` sink: these tensors, summed over micro-batches and ranks, and
# `is_min` / `is_max`, reduced.
IS_SUMS = ("is_tokens", "is_sum", "is_weight_sum", "is_clipped", "rkl_sum")


@dataclass(frozen=True)
class LossConfig:
    kind: str = setting("kd", "kd (from the teacher's cached distribution), ce (hard labels: the from-scratch "
                              "baseline) or reverse-kl (rollout caches, --onpolicy: the per-token reverse-KL "
                              "estimate log p_S(y) − log p_T(y) on the student's own samples, policy-gradient "
                              "form; fixed-cache windows of a mix keep kd)", flag="loss", choices=KINDS)
    target: str = setting("auto", "how the cached target is used: tail (top-K + tail bucket), renorm (top-K "
                                  "renormalised), sampled (top-K + tail draws); auto: sampled when the cache has "
                                  "draws, else tail", flag="kd_target", choices=KD_TARGETS)
    temperature: float = setting(0.0, "τ of the KD loss (student logits / τ, loss × τ²); 0: the cache's τ (recorded "
                                      "at capture). Another τ only with --kd-target renorm, which re-tempers the "
                                      "top K exactly")
    alpha: float = setting(1.0, "KD weight; 1 - alpha goes to hard-label CE")
    loss_chunk: int = setting(1024, "positions per loss chunk (bounds the logits' memory at chunk × vocab)")
    is_clip: float = setting(2.0, "reverse-kl: importance weights p_S(y)/p_behaviour(y) of rollout tokens sampled by "
                                  "an older checkpoint are clipped at this (0: no weighting, w = 1)")
    teacher_temperature: float = 1.0  # the cache's τ (`resolve_temperature` sets it from the cache's metadata)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PipelineError(f"--loss {self.kind!r}: use kd, ce or reverse-kl")
        if self.is_clip < 0:
            raise PipelineError(f"--is-clip {self.is_clip:g}: the importance weights' clip must be ≥ 0 (0: no weighting)")
        if self.target not in KD_TARGETS:
            raise PipelineError(f"--kd-target {self.target!r}: use one of {', '.join(KD_TARGETS)}")
        if self.temperature < 0 or self.teacher_temperature <= 0 or not 0 <= self.alpha <= 1:
            raise PipelineError("--temperature must be > 0 (or 0: the cache's) and --alpha within [0, 1]")

    @property
    def tau(self) -> float:
        """The loss's temperature: the one set, else the cache's."""
        return self.temperature or self.teacher_temperature


def resolve_temperature(loss: LossConfig, cache_temperature: float) -> LossConfig:
    """The loss at the cache's τ unless another is set, which only `renorm` can honour exactly (and CE, which
    reads no teacher target, ignores); anything else is refused with one line."""
    tau = loss.temperature or cache_temperature
    if loss.kind == "reverse-kl" and tau != 1.0:
        raise PipelineError(
            f"--loss reverse-kl at τ = {tau:g}: the estimate compares the student's and the teacher's log-probs of "
            "the sampled tokens at τ = 1; capture the caches at TEMPERATURE=1 and leave --temperature unset")
    if loss.kind != "ce" and loss.target != "renorm" and tau != cache_temperature:
        raise PipelineError(
            f"--temperature {tau:g}: the cache holds the teacher at τ = {cache_temperature:g}, and its tail mass and "
            f"draws cannot be re-tempered; train at the cache's τ (leave --temperature unset), capture a cache with "
            f"`make teacher-logits TEMPERATURE={tau:g}`, or use --kd-target renorm"
        )
    return dataclasses.replace(loss, temperature=tau, teacher_temperature=cache_temperature)


def resolve_target(target: str, has_samples: bool) -> str:
    """`auto` uses the cache's tail draws when it has them: the unbiased estimator, and in our measurements
    the one whose gradient stays closest to full-distribution KD (on the demo teacher, the parameter-gradient
    cosine of top-64 + 16 draws is 0.998, of the tail bucket 0.94: `python -m benchmarks.run --only fidelity`)."""
    if target != "auto":
        return target
    return "sampled" if has_samples else "tail"


def check_target(target: str, topk: int, where: object) -> None:
    """A (resolved) KD target the cache can serve: K = 0 holds draws only."""
    if topk == 0 and target in ("tail", "renorm"):
        raise PipelineError(f"{where}: --kd-target {target} needs top-K targets and this cache holds only draws "
                            "(pure sampling, K = 0); use --kd-target sampled (or auto)")


def teacher_weights(topk_logprobs: torch.Tensor, tail_mass: torch.Tensor | None, target: str,
                    cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher weights on S and the tail bucket r, as cached. `renorm` (no bucket) is softmax over S of
    log p · τ_c/τ: the top K renormalised, and re-tempered exactly when τ ≠ τ_c."""
    power = cfg.teacher_temperature / cfg.tau
    if target == "renorm":
        p = torch.softmax(topk_logprobs.float() * power, -1)
        return p, torch.zeros_like(p[..., 0])
    if power != 1.0:
        raise PipelineError(f"--temperature {cfg.tau:g} with the {target} target on a cache at τ = "
                            f"{cfg.teacher_temperature:g}: the tail cannot be re-tempered (see resolve_temperature)")
    p = topk_logprobs.float().exp()
    r = tail_mass.float().clamp(min=0.0) if tail_mass is not None else torch.zeros_like(p[..., 0])
    return p, r


def row_losses(z: torch.Tensor, t: dict[str, torch.Tensor], cfg: LossConfig) -> torch.Tensor:
    """Per-row loss from float32 student logits z [c, V] and this chunk's targets."""
    if cfg.kind == "reverse-kl":  # written plainly: value w·k, gradient w·k·∇log p_S(y) through autograd
        logp = torch.log_softmax(z, -1).gather(-1, t["labels"][:, None]).squeeze(-1)
        coef = (importance_weights(logp.detach(), t[BEHAVIOUR], cfg.is_clip)[0]
                * (logp.detach() - t["label_logprob"].float()))
        return coef + coef * (logp - logp.detach())
    ce = -torch.log_softmax(z, -1).gather(-1, t["labels"][:, None]).squeeze(-1) if "labels" in t else None
    if cfg.kind == "ce":
        return ce
    tau = cfg.tau
    zt = z / tau if tau != 1.0 else z
    lse = torch.logsumexp(zt, -1)
    ids = t["topk_ids"]
    logq_s = zt.gather(-1, ids) - lse[:, None]
    target = resolve_target(cfg.target, "sample_ids" in t)
    p, r = teacher_weights(t["topk_logprobs"], t.get("tail_mass"), target, cfg)
    if target == "renorm":
        kd = -(p * logq_s).sum(-1)
    elif target == "sampled":
        logq_u = zt.gather(-1, t["sample_ids"]) - lse[:, None]
        weights = t["sample_counts"].float()
        frac = weights / weights.sum(-1, keepdim=True).clamp(min=1.0)
        kd = -(p * logq_s).sum(-1) - r * (frac * logq_u).sum(-1)
    else:
        kd = -(p * logq_s).sum(-1)
        if ids.shape[-1] < z.shape[-1]:  # with K = V there is no tail bucket
            # log(1 − Σ_S q) as a log-sum-exp over the complement: stable even when Σ_S q → 1.
            log_tail_q = torch.logsumexp(zt.scatter(-1, ids, float("-inf")), -1) - lse
            kd = kd - r * log_tail_q
    kd = kd * (tau * tau)
    if cfg.alpha < 1.0:
        return cfg.alpha * kd + (1.0 - cfg.alpha) * ce
    return kd


def importance_weights(logp: torch.Tensor, behaviour: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, ratio): the ratio p_S(y)/μ(y) = exp(log p_S(y) − behaviour_logprob) and the weight used,
    min(ratio, clip), or 1 with clip 0. No gradient flows through either."""
    with torch.no_grad():
        ratio = torch.exp(logp.float() - behaviour.float())
        return (ratio.clamp(max=clip) if clip > 0 else torch.ones_like(ratio)), ratio


def reverse_kl_and_grad(z: torch.Tensor, t: dict[str, torch.Tensor], cfg: LossConfig,
                        stats: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows w·k and the gradient w·k·(onehot(y) − q) with respect to the float32 logits z [c, V] (∂ log q_y / ∂z
    = onehot(y) − q): the estimator of the module docstring, in closed form. `stats` (a dict) accumulates the
    importance weights' spread (`IS_SUMS`, `is_min`, `is_max`)."""
    y = t["labels"][:, None]
    lse = torch.logsumexp(z, -1)
    logp = z.gather(-1, y).squeeze(-1) - lse
    w, r = importance_weights(logp, t[BEHAVIOUR], cfg.is_clip)
    coef = w * (logp.detach() - t["label_logprob"].float())
    # q = exp(z − lse) built in one [c, V] buffer (z − lse[:, None] then .exp() would allocate two).
    grad = torch.sub(z, lse[:, None]).exp_().mul_(-coef[:, None]).scatter_add_(-1, y, coef[:, None])
    if stats is not None and len(logp):
        # new_full, not torch.tensor(len(r), device=...): no blocking host-to-device copy per chunk.
        add = {"is_tokens": r.new_full((), float(len(r))), "is_sum": r.sum(), "is_weight_sum": w.sum(),
               "is_clipped": (r > cfg.is_clip).sum().float() if cfg.is_clip > 0 else r.new_zeros(()),
               "rkl_sum": coef.sum()}
        for key, value in add.items():
            stats[key] = stats[key] + value if key in stats else value
        stats["is_min"] = torch.minimum(stats["is_min"], r.min()) if "is_min" in stats else r.min()
        stats["is_max"] = torch.maximum(stats["is_max"], r.max()) if "is_max" in stats else r.max()
    return coef, grad


def loss_and_grad(z: torch.Tensor, t: dict[str, torch.Tensor], cfg: LossConfig,
                  stats: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and its gradient with respect to the float32 logits z [c, V], in closed form.

    Every loss here is a soft cross-entropy −Σ_x w_x log q_x against some target weights w (with the tail
    bucket, the bucket's weight r is spread over the complement of S in proportion to q). Its gradient is
    (Σ w)·q − w, so one softmax, one scaling pass and a few [c, K] scatters replace an autograd graph over
    [c, V] tensors. `row_losses` is the same loss written plainly, and the tests hold the two together.
    The soft-cap bounds the logits, so every q_x ≥ e^(−2·cap)/V stays far above float32 underflow and
    log q can be taken from q itself. A student without a final soft-cap (null in its config) can drive a q
    to 0: log q is then taken at the smallest normal float32 (`_log`), so a target weight of 0 there adds 0,
    not 0 · log 0 = NaN, and a positive one a large finite loss. `reverse-kl`: `reverse_kl_and_grad`, which
    alone fills `stats`."""
    if cfg.kind == "reverse-kl":
        return reverse_kl_and_grad(z, t, cfg, stats)
    ce_rows = ce_grad = None
    if cfg.kind == "ce" or cfg.alpha < 1.0:
        labels = t["labels"][:, None]
        q1 = torch.softmax(z, -1)
        ce_rows = -_log(q1.gather(-1, labels).squeeze(-1))
        ce_grad = q1.scatter_add_(-1, labels, torch.full_like(labels, -1.0, dtype=z.dtype))
        if cfg.kind == "ce":
            return ce_rows, ce_grad
    tau = cfg.tau
    q = torch.softmax(z / tau if tau != 1.0 else z, -1)
    ids = t["topk_ids"]
    q_s = q.gather(-1, ids)
    target = resolve_target(cfg.target, "sample_ids" in t)
    p, r = teacher_weights(t["topk_logprobs"], t.get("tail_mass"), target, cfg)
    if target == "renorm":
        rows = -(p * _log(q_s)).sum(-1)
        grad = q.scatter_add_(-1, ids, -p)
    elif target == "sampled":
        counts = t["sample_counts"].float()
        frac = r[:, None] * counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
        rows = -(p * _log(q_s)).sum(-1) - (frac * _log(q.gather(-1, t["sample_ids"]))).sum(-1)
        mass = p.sum(-1) + frac.sum(-1)
        grad = q.mul_(mass[:, None]).scatter_add_(-1, ids, -p).scatter_add_(-1, t["sample_ids"], -frac)
    else:
        rows = -(p * _log(q_s)).sum(-1)
        mass = p.sum(-1) + r
        if ids.shape[-1] < z.shape[-1]:  # with K = V there is no tail bucket
            # Σ_{x∉S} q_x summed directly over the complement (zero S in place: no 1 − Σ_S q cancellation).
            q = q.scatter_(-1, ids, 0.0)
            q_tail = q.sum(-1)
            rows = rows - r * _log(q_tail)
            k_tail = r / q_tail
            # ∂/∂z: mass·q_x − p_x on S; (mass − r/q_tail)·q_x outside S.
            grad = q.mul_((mass - k_tail)[:, None]).scatter_add_(-1, ids, q_s * mass[:, None] - p)
        else:
            grad = q.mul_(mass[:, None]).scatter_add_(-1, ids, -p)
    if tau != 1.0:
        rows, grad = rows * (tau * tau), grad.mul_(tau)  # d/dz of τ²·L(z/τ) is τ·∇L
    if ce_rows is not None:
        rows = cfg.alpha * rows + (1 - cfg.alpha) * ce_rows
        grad = grad.mul_(cfg.alpha).add_(ce_grad, alpha=1 - cfg.alpha)
    return rows, grad


def _log(q: torch.Tensor) -> torch.Tensor:
    """log q of probabilities [c, K] (never [c, V]), with q = 0 read as the smallest normal float32."""
    return q.clamp_min(torch.finfo(q.dtype).tiny).log()


class _ChunkedLoss(torch.autograd.Function):
    """Sum over rows of the loss; gradients with respect to h and E are computed chunk by chunk during the
    forward pass (one matmul for the logits, two for the gradients), never holding [N, V]."""

    @staticmethod
    def forward(ctx, hidden, weight, cap, cfg, stats, names, *values):  # type: ignore[no-untyped-def,override]
        targets = dict(zip(names, values))
        need = hidden.requires_grad or weight.requires_grad
        grad_h = torch.zeros_like(hidden) if need else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The matmuls' dtype: autocast's, else the weight's. The tied embedding is cast to it once here, for
        # every chunk (under FSDP's bf16 gathers it already is); each product comes out float32 (`float32_mm`).
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        for s in range(0, hidden.shape[0], cfg.loss_chunk):
            h = hidden[s : s + cfg.loss_chunk].to(dtype)
            chunk = {k: v[s : s + cfg.loss_chunk] for k, v in targets.items()}
            z = softcap_(float32_mm(h, w.T), cap)  # the student's final soft-cap, in place
            rows, dz = loss_and_grad(z, chunk, cfg, stats)
            total += rows.sum()
            if need:
                if cap is not None:  # through the soft-cap: d/dx cap·tanh(x/cap) = 1 − tanh², in place on z
                    dz = dz.mul_(z.div_(cap).square_().neg_().add_(1.0))
                del z
                dz = dz.to(dtype)
                grad_h[s : s + h.shape[0]] = float32_mm(dz, w).to(hidden.dtype)
                grad_w += float32_mm(dz.T, h)
            del dz
        ctx.n_targets = len(values)
        if need:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def,override]
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out, grad_w * grad_out, None, None, None, None) + (None,) * ctx.n_targets


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, targets: dict[str, torch.Tensor],
                 cfg: LossConfig, denominator: float | torch.Tensor | None = None,
                 stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum of the per-row losses divided by `denominator` (default: the number of rows, i.e. the mean).
    hidden [N, H] (after the final norm), weight the tied embedding [V, H], targets flattened to rows: labels
    [N]; for kd topk_ids [N, K], topk_logprobs [N, K], tail_mass [N] and, for `sampled`, sample_ids /
    sample_counts [N, S]; for reverse-kl labels, label_logprob [N] and behaviour_logprob [N] (`stats`: a dict
    the importance weights' spread is accumulated into)."""
    names = tuple(targets)
    total = _ChunkedLoss.apply(hidden, weight, cap, cfg, stats, names, *(targets[n] for n in names))
    return total / (hidden.shape[0] if denominator is None else denominator)
