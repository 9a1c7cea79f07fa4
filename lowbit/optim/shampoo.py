"""Blocked Shampoo with 32-, 8- or 4-bit preconditioners, grafted to AdamW, optionally distributed.

Each matrix parameter (viewed as shape[0] × rest) is cut into blocks of at most
`max_preconditioner_dim` per side. A block G keeps statistics L = β L + (1-β) G Gᵀ and
R = β R + (1-β) Gᵀ G (every `stats_every` steps) and preconditioners L^-1/4, R^-1/4 (every
`inverse_every` steps, from eigendecompositions with eigenvalues floored at matrix_eps · λmax).
The direction L^-1/4 · m̂ · R^-1/4 (m̂: Adam's bias-corrected first moment) is rescaled to the norm of
AdamW's direction m̂ / (√v̂ + eps) on the same block ("grafting"), so the learning rate and schedule
of AdamW carry over. Vectors (norms, biases) take the AdamW step.

At 8 or 4 bits (Wang et al. 2024) a symmetric matrix is stored as its eigenvalues (fp32) and its
eigenvector matrix quantized block-wise with the linear-square map; after dequantization the
eigenvectors are re-orthogonalized with Björck iterations U ← U (3I − UᵀU) / 2 before use. That
is 4 × (0.5 + 4/block) B per entry against 16 B for the four fp32 matrices of 32-bit Shampoo.

Under torch.distributed (`distributed=True`) each rank owns a share of the blocks (greedy by cost):
only the owner keeps their statistics and computes their directions; the directions are
all-gathered so every rank applies the same update. Such an optimizer has `per_rank_state = True`:
its state_dict holds this rank's blocks and must be saved per rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from lowbit.optim import qmaps
from lowbit.optim.adamw import adam_scalars, check_adamw_hparams, restore_state_dtypes, state_bytes
from lowbit.optim.rounding import step_seed, write_param_


def bjorck_orthonormalize(u: torch.Tensor, iters: int) -> torch.Tensor:
    """Björck–Bowie iterations U ← U (3I − UᵀU) / 2: pull a near-orthogonal U to the orthogonal one."""
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    for _ in range(iters):
        u = u @ (1.5 * eye - 0.5 * (u.T @ u))
    return u


def quantize_eigvecs(u: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvector matrix -> (codes, block absmax) on the linear-square map; 4-bit codes packed."""
    codes, absmax = qmaps.quantize_blockwise(u, qmaps.linear_square_map(bits), block)
    return (qmaps.pack_nibbles(codes) if bits == 4 else codes), absmax


def dequantize_eigvecs(
    codes: torch.Tensor, absmax: torch.Tensor, bits: int, block: int, d: int
) -> torch.Tensor:
    """Inverse of `quantize_eigvecs`: the d × d matrix (not yet re-orthogonalized)."""
    if bits == 4:
        codes = qmaps.unpack_nibbles(codes, d * d)
    return qmaps.dequantize_blockwise(codes, absmax, qmaps.linear_square_map(bits), block, torch.Size((d, d)))


def _numel(b: dict) -> int:
    return (b["rows"][1] - b["rows"][0]) * (b["cols"][1] - b["cols"][0])


def symmetric_eigh(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a symmetric statistic, robust to LAPACK's convergence failures.

    The divide-and-conquer solver can fail on matrices with many (near-)repeated eigenvalues: a
    preconditioner statistic of a few low-rank gradients is such a matrix, and one CPU LAPACK build
    failed on it where another did not (2 ranks of DDP Shampoo, 2026-11-23). Such a matrix is
    retried in float64, then with a tiny diagonal of distinct values added (it splits repeated
    eigenvalues; a multiple of I would not), so a step never dies on it: the eigenvalues move by
    at most 2e-6 of the largest diagonal entry. A non-finite matrix is an error.
    """
    try:
        return torch.linalg.eigh(mat)
    except torch.linalg.LinAlgError:
        pass
    if not torch.isfinite(mat).all():
        raise FloatingPointError("Shampoo statistic holds NaN or Inf (non-finite gradients?)")
    m64 = mat.double()
    d = m64.shape[0]
    size = m64.diagonal().abs().max().clamp(min=1e-30)
    ramp = 1.0 + torch.arange(d, dtype=m64.dtype, device=m64.device) / d
    for shift in (0.0, 1e-12, 1e-9, 1e-6):
        try:
            lam, u = torch.linalg.eigh(m64 + torch.diag(shift * size * ramp))
        except torch.linalg.LinAlgError:
            continue
        return lam.to(mat.dtype), u.to(mat.dtype)
    raise torch.linalg.LinAlgError(f"eigh of a {tuple(mat.shape)} Shampoo statistic failed even when shifted")


class Shampoo(torch.optim.Optimizer):
    """Blocked Shampoo (`bits` ∈ {32, 8, 4} for the preconditioners) grafted to AdamW."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bits: int = 32,
        max_preconditioner_dim: int = 1024,
        stats_every: int = 1,
        inverse_every: int = 10,
        shampoo_beta: float = 0.95,
        matrix_eps: float = 1e-6,
        bjorck_iters: int = 1,
        eigvec_block: int = 64,
        bf16_rounding: str = "nearest",
        seed: int = 0,
        distributed: bool = True,
        process_group: Any = None,
    ) -> None:
        if bits not in (32, 8, 4):
            raise ValueError(f"bits={bits}; valid choices: 32, 8, 4")
        check_adamw_hparams(lr, betas, eps, weight_decay, bf16_rounding)
        dim, blk = max_preconditioner_dim, eigvec_block
        for key, val, ok, valid in [
            ("max_preconditioner_dim", dim, dim >= 2, "an integer >= 2"),
            ("stats_every", stats_every, stats_every >= 1, "an integer >= 1"),
            ("inverse_every", inverse_every, inverse_every >= 1, "an integer >= 1"),
            ("shampoo_beta", shampoo_beta, 0 < shampoo_beta <= 1, "in (0, 1]"),
            ("matrix_eps", matrix_eps, matrix_eps > 0, "> 0"),
            ("bjorck_iters", bjorck_iters, bjorck_iters >= 0, "an integer >= 0"),
            ("eigvec_block", blk, blk >= 2 and blk % 2 == 0, "an even integer >= 2"),
        ]:
            if not ok:
                raise ValueError(f"{key}={val!r} is out of range; valid: {valid}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, seed=seed)
        super().__init__(params, defaults)
        self.bits, self.max_dim, self.block = bits, max_preconditioner_dim, eigvec_block
        self.stats_every, self.inverse_every = stats_every, inverse_every
        self.beta, self.matrix_eps, self.bjorck_iters = shampoo_beta, matrix_eps, bjorck_iters
        self.bf16_rounding = bf16_rounding
        self.group = process_group
        active = distributed and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(process_group) if active else 1
        self.rank = dist.get_rank(process_group) if active else 0
        self.per_rank_state = self.world > 1
        self.blocks = self._plan_blocks()

    def add_param_group(self, param_group: dict) -> None:
        """Add a group as torch does, and plan preconditioner blocks for its matrices (appended to
        the plan: existing blocks keep their ids and owners, so their state stays valid)."""
        super().add_param_group(param_group)
        if hasattr(self, "blocks"):  # not during __init__, which plans all groups at once
            self.blocks = self._plan_blocks(self.blocks)

    # ----------------------------------------------------------------- block plan
    def _plan_blocks(self, planned: list[dict] | None = None) -> list[dict]:
        """Every matrix block (param index, rows, cols) and its owning rank, the same on all ranks.

        `planned`: an existing plan to extend with the parameters it does not cover yet (those of
        groups added later); its blocks keep their ids and owners, new ones go to the least-loaded ranks.
        """
        planned = planned or []
        done = {b["param"] for b in planned}
        start = len(planned)
        blocks = list(planned)
        params = [p for g in self.param_groups for p in g["params"]]
        for pi, p in enumerate(params):
            if p.dim() < 2 or pi in done:
                continue
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            for r0 in range(0, rows, self.max_dim):
                for c0 in range(0, cols, self.max_dim):
                    r1, c1 = min(r0 + self.max_dim, rows), min(c0 + self.max_dim, cols)
                    blocks.append({"param": pi, "rows": (r0, r1), "cols": (c0, c1), "id": len(blocks)})
        load = [0.0] * self.world
        for b in planned:
            load[b["owner"]] += self._cost(b)
        for b in sorted(blocks[start:], key=lambda b: (-self._cost(b), b["id"])):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            b["owner"] = owner
            load[owner] += self._cost(b)
        return blocks

    @staticmethod
    def _cost(b: dict) -> float:
        (r0, r1), (c0, c1) = b["rows"], b["cols"]
        return float((r1 - r0) ** 3 + (c1 - c0) ** 3)

    # ----------------------------------------------------------------- matrices in state
    def _put(self, st: dict, key: str, mat: torch.Tensor, evals: torch.Tensor | None = None) -> None:
        """Store a symmetric matrix: as is at 32 bits, else as fp32 eigenvalues + quantized eigenvectors."""
        if self.bits == 32:
            st[key] = mat
            return
        codes, absmax = quantize_eigvecs(mat, self.bits, self.block)
        st[key + ".vec_codes"], st[key + ".vec_absmax"], st[key + ".val"] = codes, absmax, evals

    def _eig(self, st: dict, key: str, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = dequantize_eigvecs(st[key + ".vec_codes"], st[key + ".vec_absmax"], self.bits, self.block, d)
        return st[key + ".val"], bjorck_orthonormalize(u, self.bjorck_iters)

    def _has(self, st: dict, key: str) -> bool:
        return key in st or key + ".val" in st

    def _update_stat(
        self, st: dict, key: str, outer: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """L ← β L + (1-β) outer. Returns the eigendecomposition when the matrix is stored quantized."""
        d = outer.shape[0]
        if self.bits == 32:
            prev = st.get(key, torch.zeros_like(outer))
            st[key] = prev * self.beta + outer * (1 - self.beta)
            return None
        if self._has(st, key):
            lam, u = self._eig(st, key, d)
            prev = (u * lam) @ u.T
        else:
            prev = torch.zeros_like(outer)
        mat = prev * self.beta + outer * (1 - self.beta)
        lam, u = symmetric_eigh(mat)
        self._put(st, key, u, lam)
        return lam, u

    def _inverse_root(self, st: dict, key: str, d: int, eig: tuple | None) -> None:
        """P = (L + ε λmax I)^-1/4, stored like the statistics."""
        if self.bits == 32:
            lam, u = symmetric_eigh(st[key])
        else:
            lam, u = eig if eig is not None else self._eig(st, key, d)
        lam = lam.clamp(min=0)
        root = (lam + self.matrix_eps * lam.max().clamp(min=1e-30)) ** -0.25
        if self.bits == 32:
            st["P" + key] = (u * root) @ u.T
        else:
            self._put(st, "P" + key, u, root)

    def _precond(self, st: dict, key: str, d: int) -> torch.Tensor:
        if self.bits == 32:
            return st["P" + key]
        root, u = self._eig(st, "P" + key, d)
        return (u * root) @ u.T

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        updates: dict[int, dict] = {}
        for pi, (p, group) in enumerate(params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Shampoo does not support sparse gradients")
            st = self.state[p]
            if "step" not in st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                if p.dtype == torch.bfloat16 and self.bf16_rounding == "kahan":
                    st["kahan_comp"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=p.device)
            st["step"] += 1
            b1, b2 = group["betas"]
            g = p.grad.float()
            st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = st["exp_avg"] / (1 - b1 ** st["step"])
            adam_dir = m_hat / ((st["exp_avg_sq"] / (1 - b2 ** st["step"])).sqrt() + group["eps"])
            updates[pi] = {"grad": g, "m_hat": m_hat, "dir": adam_dir, "step": st["step"]}
        directions = {}
        for b in self.blocks:
            u = updates.get(b["param"])
            if u is None or b["owner"] != self.rank:
                continue
            directions[b["id"]] = self._block_direction(b, params[b["param"]][0], u)
        if self.world > 1:
            directions = self._all_gather(directions, updates, params)
        for b in self.blocks:
            if b["id"] in directions:
                (r0, r1), (c0, c1) = b["rows"], b["cols"]
                mat = updates[b["param"]]["dir"].view(params[b["param"]][0].shape[0], -1)
                mat[r0:r1, c0:c1] = directions[b["id"]]
        for pi, u in updates.items():
            p, group = params[pi]
            s = adam_scalars(group["lr"], *group["betas"], group["eps"], group["weight_decay"], u["step"])
            old = p.detach().float()
            new = old * s["decay"] - u["dir"] * group["lr"]
            seed = step_seed(group["seed"], u["step"], pi + 1)
            write_param_(p, new, self.bf16_rounding, seed, self.state[p].get("kahan_comp"), old)
        return loss

    def _block_direction(self, b: dict, p: torch.Tensor, u: dict) -> torch.Tensor:
        st = self.state[p]
        (r0, r1), (c0, c1) = b["rows"], b["cols"]
        g = u["grad"].view(p.shape[0], -1)[r0:r1, c0:c1]
        m = u["m_hat"].view(p.shape[0], -1)[r0:r1, c0:c1]
        adam = u["dir"].view(p.shape[0], -1)[r0:r1, c0:c1]
        key = f"blk{b['id']}."
        step = u["step"]
        eig_l = eig_r = None
        if (step - 1) % self.stats_every == 0:
            eig_l = self._update_stat(st, key + "L", g @ g.T)
            eig_r = self._update_stat(st, key + "R", g.T @ g)
        if (step - 1) % self.inverse_every == 0 or not self._has(st, "P" + key + "L"):
            self._inverse_root(st, key + "L", r1 - r0, eig_l)
            self._inverse_root(st, key + "R", c1 - c0, eig_r)
        d = self._precond(st, key + "L", r1 - r0) @ m @ self._precond(st, key + "R", c1 - c0)
        # Grafting: Shampoo's direction with AdamW's per-block norm.
        norm = d.norm()
        return d * (adam.norm() / norm) if norm > 0 else adam.clone()

    def _all_gather(self, mine: dict, updates: dict, params: list) -> dict:
        """Every rank's block directions, in the plan's order, via one padded all_gather."""
        per_rank: list[list[dict]] = [[] for _ in range(self.world)]
        for b in self.blocks:
            if b["param"] in updates:
                per_rank[b["owner"]].append(b)
        sizes = [sum(_numel(b) for b in bl) for bl in per_rank]
        dev = next((u["dir"].device for u in updates.values()), torch.device("cpu"))
        buf = torch.zeros(max(sizes), dtype=torch.float32, device=dev)
        offset = 0
        for b in per_rank[self.rank]:
            d = mine[b["id"]].reshape(-1)
            buf[offset : offset + d.numel()] = d
            offset += d.numel()
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf, group=self.group)
        result = {}
        for r, bl in enumerate(per_rank):
            offset = 0
            for b in bl:
                shape = (b["rows"][1] - b["rows"][0], b["cols"][1] - b["cols"][0])
                result[b["id"]] = out[r][offset : offset + _numel(b)].view(shape)
                offset += _numel(b)
        return result

    # ----------------------------------------------------------------- memory / checkpoints
    def preconditioner_bytes(self) -> int:
        """Bytes of the Shampoo statistics and preconditioners held on this rank."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for k, v in st.items()
            if k.startswith(("blk", "Pblk")) and torch.is_tensor(v)
        )

    def state_bytes(self) -> int:
        return state_bytes(self)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
