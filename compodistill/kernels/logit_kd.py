"""Triton kernel: per-row logit-distillation loss and its gradient w.r.t. the student logits.

One program handles one token row. It streams the row over vocab blocks:

1. pass 1 keeps online max / sum-of-exp for the student (z_s / T), the teacher (z_t / T) and,
   with CE, the raw student logits; for reverse KL it also keeps Σ e^{a-m}(a-b), which gives
   KL(p_s‖p_t) before any gradient is written;
2. pass 2 computes the loss terms and writes dL/dz_s (kl, reverse_kl);
3. jsd only: pass 2 just reduces C = Σ p_s·g, pass 3 writes p_s·(g − C) (the gradient needs
   that row sum, and the output may alias the logits, so it cannot be written in pass 2).

All arithmetic is float32. The gradient may be written over the student logits in place
(the fused linear path does that to save one chunk × V buffer). zscore (LLAVADI) is not
handled here: its backward needs another row reduction, the PyTorch path does it.

Imports only torch and triton; runs on CUDA and under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import fitted_dtype_configs, interpreting, launch, prune_hook

LOSS_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}

# (BLOCK, warps, student-logit dtypes fitting sm_80, sm_90 with Triton 3.8[, {version:
# (sm_80, sm_90)}]): zero spill bytes in every loss / CE / teacher-dtype specialisation,
# measured by compodistill/kernels/report.py.
_F16, _BF16, _F32 = "float16", "bfloat16", "float32"
_ALL = (_F16, _BF16, _F32)


def _configs():
    if interpreting():  # the interpreter is slow: one small config
        return fitted_dtype_configs("_kd_rows_kernel", "zs_ptr", [(256, 4, _ALL, _ALL)])
    return fitted_dtype_configs("_kd_rows_kernel", "zs_ptr", [
        # From the full sweep (every loss, CE on/off, an fp32 teacher): 4-32 B spill in the
        # specialisations left out here.
        (2048, 8, _ALL, _ALL, {"3.6": ((_F16, _F32), (_BF16, _F16))}),
        (2048, 16, (), (_F16,), {"3.6": (_ALL, (_BF16, _F16))}),
        (4096, 8, (_BF16, _F32), (), {"3.6": ((), (_F32,))}),
        (4096, 16, _ALL, (_BF16, _F16), {"3.6": ((_F16, _F32), _ALL)}),
        (8192, 8, (_BF16, _F16), (_BF16,), {"3.6": ((_F32,), (_F32,))}),
        (8192, 16, (), (), {"3.6": ((_F16, _F32), _ALL)}),
    ])


@triton.autotune(configs=_configs(), key=["V", "LOSS", "HAS_CE"], restore_value=["grad_ptr"],
                 prune_configs_by=prune_hook("_kd_rows_kernel"))
@triton.jit
def _kd_rows_kernel(zs_ptr, zs_stride, zt_ptr, zt_stride, grad_ptr, grad_stride, loss_ptr,
                    kd_scale_ptr, ce_scale_ptr, labels_ptr, V, inv_temp, beta,
                    LOSS: tl.constexpr, HAS_CE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride
    g_row = grad_ptr + row * grad_stride
    inv_t = tl.cast(inv_temp, tl.float32)
    beta = tl.cast(beta, tl.float32)
    kd_scale = tl.load(kd_scale_ptr + row)  # kd_weight * T^2 / n_kd, 0 for unselected rows
    offs = tl.arange(0, BLOCK)

    # ---- pass 1: online softmax statistics ------------------------------------------------
    m_a = float("-inf")
    s_a = 0.0
    m_b = float("-inf")
    s_b = 0.0
    w = 0.0  # Σ e^{a - m_a} (a - b), rescaled with s_a (reverse KL only)
    m_r = float("-inf")
    s_r = 0.0
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        # Masked lanes load 0 (keeps a - b finite) and are set to -inf for the max / exp.
        zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.where(mask, zs * inv_t, float("-inf"))
        b = tl.where(mask, zt * inv_t, float("-inf"))
        new_m_a = tl.maximum(m_a, tl.max(a, axis=0))
        alpha = tl.exp(m_a - new_m_a)
        ea = tl.where(mask, tl.exp(a - new_m_a), 0.0)
        s_a = s_a * alpha + tl.sum(ea, axis=0)
        if LOSS == 1:
            w = w * alpha + tl.sum(ea * (zs - zt) * inv_t, axis=0)
        m_a = new_m_a
        new_m_b = tl.maximum(m_b, tl.max(b, axis=0))
        eb = tl.where(mask, tl.exp(b - new_m_b), 0.0)
        s_b = s_b * tl.exp(m_b - new_m_b) + tl.sum(eb, axis=0)
        m_b = new_m_b
        if HAS_CE:
            r = tl.where(mask, zs, float("-inf"))
            new_m_r = tl.maximum(m_r, tl.max(r, axis=0))
            er = tl.where(mask, tl.exp(r - new_m_r), 0.0)
            s_r = s_r * tl.exp(m_r - new_m_r) + tl.sum(er, axis=0)
            m_r = new_m_r
    lse_a = m_a + tl.log(s_a)
    lse_b = m_b + tl.log(s_b)
    kl_rev = w / s_a - lse_a + lse_b  # KL(p_s‖p_t) = Σ p_s (a − b) − lse_a + lse_b
    # Clamped so beta in {0, 1} gives a huge negative number rather than log(0); that branch
    # then carries no weight in the logaddexp below (and beta = 0 or 1 makes the jsd 0).
    log_beta = tl.log(tl.maximum(beta, 1e-30))
    log_1mb = tl.log(tl.maximum(1.0 - beta, 1e-30))

    ce_scale = 0.0
    label = 0
    ce_loss = 0.0
    if HAS_CE:
        ce_scale = tl.load(ce_scale_ptr + row)
        label = tl.load(labels_ptr + row).to(tl.int64)
        label = tl.where((label >= 0) & (label < V), label, 0)  # -100 rows have ce_scale 0
        z_label = tl.load(zs_row + label).to(tl.float32)
        ce_loss = m_r + tl.log(s_r) - z_label

    # ---- pass 2: loss terms (and the gradient, except for jsd) ----------------------------
    gscale = kd_scale * inv_t  # dL/dz = (1/T) dL/da
    acc = 0.0
    c_sum = 0.0  # jsd: Σ p_s g
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
        zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
        lp_s = zs * inv_t - lse_a
        lp_t = zt * inv_t - lse_b
        p_s = tl.exp(lp_s)
        p_t = tl.exp(lp_t)
        if LOSS == 0:
            term = p_t * (lp_t - lp_s)
            grad = gscale * (p_s - p_t)
        elif LOSS == 1:
            term = p_s * (lp_s - lp_t)
            grad = gscale * p_s * (lp_s - lp_t - kl_rev)
        else:
            x = log_beta + lp_t
            y = log_1mb + lp_s
            mx = tl.maximum(x, y)
            lm = mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))
            term = beta * p_t * (lp_t - lm) + (1.0 - beta) * p_s * (lp_s - lm)
            c_sum += tl.sum(tl.where(mask, p_s * (1.0 - beta) * (lp_s - lm), 0.0), axis=0)
            grad = p_s  # unused
        acc += tl.sum(tl.where(mask, term, 0.0), axis=0)
        if LOSS != 2:
            if HAS_CE:
                p_r = tl.exp(zs - m_r) / s_r
                grad += ce_scale * (p_r - tl.where(cols == label, 1.0, 0.0))
            tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    # ---- pass 3 (jsd): gradient p_s (g − Σ p_s g) -----------------------------------------
    if LOSS == 2:
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            zs = tl.load(zs_row + cols, mask=mask, other=0.0).to(tl.float32)
            zt = tl.load(zt_row + cols, mask=mask, other=0.0).to(tl.float32)
            lp_s = zs * inv_t - lse_a
            lp_t = zt * inv_t - lse_b
            x = log_beta + lp_t
            y = log_1mb + lp_s
            mx = tl.maximum(x, y)
            lm = mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))
            p_s = tl.exp(lp_s)
            grad = gscale * p_s * ((1.0 - beta) * (lp_s - lm) - c_sum)
            if HAS_CE:
                p_r = tl.exp(zs - m_r) / s_r
                grad += ce_scale * (p_r - tl.where(cols == label, 1.0, 0.0))
            tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    # The two terms apart, so one fused call can report both (LM and KD in one lm_head pass).
    tl.store(loss_ptr + 2 * row, kd_scale * acc)
    tl.store(loss_ptr + 2 * row + 1, ce_scale * ce_loss)


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kd_scale: torch.Tensor,
            *, loss: str = "kl", beta: float = 0.5, temperature: float = 1.0,
            labels: torch.Tensor | None = None, ce_scale: torch.Tensor | None = None,
            grad_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted per-row loss and dL/d(student_logits) for rows of logits.

    Args:
        student_logits: (n, Vs), any float dtype, unit stride along the vocab.
        teacher_logits: (n, Vt >= Vs); only the first Vs columns are read.
        kd_scale: (n,) float32 row weights of the KD term (already including T² and 1/n_kd).
        loss, beta, temperature: as in :func:`compodistill.logit_kd.from_logits.logit_distillation_loss`.
        labels, ce_scale: optional (n,) targets and float32 weights of a student CE term on the
            raw logits (rows with ce_scale 0 may hold -100).
        grad_out: (n, Vs) buffer for the gradient; may be ``student_logits`` itself (in place).
            Defaults to a new tensor of the student dtype.

    Returns:
        (row_loss float32 (n, 2), grad (n, Vs)): row_loss[:, 0] = kd_scale·KD_row and
        row_loss[:, 1] = ce_scale·CE_row; grad is the gradient of their sum w.r.t. the student
        logits.
    """
    n, V = student_logits.shape
    if grad_out is None:
        grad_out = torch.empty_like(student_logits)
    zs, zt, g = student_logits, teacher_logits, grad_out
    if interpreting():
        # The interpreter's half-precision arithmetic is unreliable: work in float32 there.
        zs, zt, g = zs.float(), zt.float(), torch.empty(n, V, dtype=torch.float32)
    if zs.stride(-1) != 1:
        zs = zs.contiguous()
    if zt.stride(-1) != 1:
        zt = zt.contiguous()
    row_loss = torch.empty(n, 2, dtype=torch.float32, device=zs.device)
    has_ce = labels is not None and ce_scale is not None
    dummy = kd_scale  # any tensor: never read when HAS_CE is False
    if n > 0:
        launch(_kd_rows_kernel, (n,),
            zs, zs.stride(0), zt, zt.stride(0), g, g.stride(0), row_loss,
            kd_scale.float().contiguous(),
            ce_scale.float().contiguous() if has_ce else dummy,
            labels.contiguous() if has_ce else dummy,
            V, 1.0 / float(temperature), float(beta),
            LOSS=LOSS_CODES[loss], HAS_CE=has_ce)
    if g is not grad_out:
        grad_out.copy_(g)
    return row_loss, grad_out
