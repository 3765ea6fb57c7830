"""Precision: which numeric format a run computes in, and the fp32 master weights of ``bf16-master``.

Two ways to train in bf16:

- ``bf16`` (autocast): the weights stay fp32; autocast casts each weight to bf16 in every forward pass and
  each bf16 weight gradient back to fp32 in every backward pass. Simple, and the usual choice on GPUs.
- ``bf16-master``: the model itself is bf16 and the optimizer updates an fp32 *master* copy of the weights,
  which is copied back into the model once per optimizer step. On a CPU those per-pass casts are pure memory
  traffic: in a torch.profiler trace of a 12-token SST-2 step of SmolLM2-135M they were ~27% of the
  forward+backward time (``aten::copy_``), and keeping the model in bf16 removed them (forward+backward
  0.51 s -> 0.36 s). The optimizer state and the weights it updates stay fp32, so small updates are not
  lost to bf16 rounding (lr 5e-5 x a weight of 0.05 is below bf16's 2^-8 relative step).

``bf16-master`` needs every weight to be trainable (``--method full``: the fp32 masters are then the whole
model, so the saved folder is exact) and one process (folding micro-batch gradients into fp32 between
backward passes would skip DDP's all-reduce).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

MASTER = "bf16-master"


def native_bf16_cpu() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products run in hardware (elsewhere bf16 is emulated and slower than fp32)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(precision: str, *, master_ok: bool = False) -> str:
    """Map --precision to what a run uses: ``no`` (fp32), ``bf16`` / ``fp16`` (autocast) or ``bf16-master``.

    ``auto`` picks ``bf16-master`` on CPUs with native bf16 when ``master_ok`` (a one-process full fine-tune),
    bf16 autocast on CUDA GPUs with bf16 (fp16 without) and on such CPUs otherwise, and fp32 elsewhere.
    An explicit ``bf16-master`` falls back to bf16 autocast where ``master_ok`` is false (e.g. inference).
    """
    if precision == "fp32":
        return "no"
    if precision in ("bf16", "fp16"):
        return precision
    if precision == MASTER:
        return MASTER if master_ok else "bf16"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if native_bf16_cpu():
        return MASTER if master_ok else "bf16"
    return "no"


def _chunks(items: list[int], numels: list[int], max_numel: int) -> Iterator[list[int]]:
    chunk, size = [], 0
    for i in items:
        if chunk and size + numels[i] > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += numels[i]
    if chunk:
        yield chunk


class MasterWeights:
    """fp32 master copies of a bf16 model's trainable weights; the optimizer is built over :attr:`masters`.

    Per optimizer step: ``fold()`` after each backward pass except the last of a step (keeps the running
    gradient sum in fp32), ``grad_norm()`` (nothing is changed, so a non-finite norm can stop the run before
    the update), then ``step()``: bf16 gradients become fp32 a chunk of parameters at a time in one reused
    buffer (extra memory one chunk, not a second full set of gradients; a fresh allocation per step cost
    more in page faults than the conversion itself), clipping is folded into the fused optimizer kernel as
    its gradient scale, and the updated masters are copied back into the bf16 model.
    """

    CHUNK_NUMEL = 8_000_000  # ~32 MB of fp32 gradients at a time

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        self._numels = [p.numel() for p in self.params]
        self._folded = False
        self._buffer: torch.Tensor | None = None
        with torch.no_grad():
            # Parameters only: buffers such as rotary inverse frequencies stay fp32 (bf16 would shift positions).
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)

    def by_name(self) -> dict[str, torch.nn.Parameter]:
        return dict(zip(self.names, self.masters))

    def state(self, *, copy: bool = False) -> dict[str, torch.Tensor]:
        """The fp32 trainable weights by name (shared with the masters unless ``copy``)."""
        return {n: (m.detach().clone() if copy else m.detach()) for n, m in zip(self.names, self.masters)}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Set masters and model from fp32 weights by name (a checkpoint, the best weights)."""
        with torch.no_grad():
            for n, m, p in zip(self.names, self.masters, self.params):
                m.copy_(state[n].to(m.device, torch.float32))
                p.copy_(m)

    def fold(self) -> None:
        """Add the bf16 gradients of the last backward pass into fp32 sums and free them."""
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                if p.grad is None:
                    continue
                if m.grad is None:
                    m.grad = p.grad.float()
                else:
                    m.grad.add_(p.grad)
                p.grad = None
        self._folded = True

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = None
            m.grad = None
        self._folded = False

    def grad_norm(self) -> float:
        """L2 norm of the step's whole gradient (fp32 sums plus any bf16 gradients not yet folded)."""
        if self._folded:
            self.fold()  # the last micro-batch too, so one fp32 tensor per parameter holds the sum
            grads = [m.grad for m in self.masters if m.grad is not None]
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        # Per-tensor norms accumulate in fp32 inside the kernel either way; asking for an fp32 result
        # (dtype=) made PyTorch convert every bf16 gradient first, ~6x slower. The bf16 result is within
        # 0.4% of the exact norm, which is plenty for clipping and for catching inf/NaN.
        norms = torch._foreach_norm(grads, 2)
        return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: float, max_norm: float | None) -> None:
        """Clip to ``max_norm`` (given the norm from :meth:`grad_norm`), update the masters, refresh the model."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
        scale = None
        if max_norm and grad_norm > max_norm:
            scale = (grad_norm + 1e-6) / max_norm  # the same coefficient as torch.nn.utils.clip_grad_norm_
        fused = any(g.get("fused") for g in inner.param_groups)
        live = [i for i, m in enumerate(self.masters) if m.grad is not None or self.params[i].grad is not None]
        try:
            if scale is not None and fused:  # the fused kernel divides each gradient by grad_scale as it reads it
                inner.grad_scale = torch.tensor(scale, dtype=torch.float32)
            for chunk in _chunks(live, self._numels, self.CHUNK_NUMEL):
                with torch.no_grad():
                    offset = 0
                    for i in chunk:
                        p, m = self.params[i], self.masters[i]
                        if m.grad is None:
                            m.grad = self._grad_slot(offset, m).copy_(p.grad)
                            offset += m.numel()
                        p.grad = None
                    if scale is not None and not fused:
                        torch._foreach_div_([self.masters[i].grad for i in chunk], scale)
                # AdamW skips parameters without a gradient, so each call updates exactly this chunk.
                inner.step()
                with torch.no_grad():
                    for i in chunk:
                        m = self.masters[i]
                        m.grad = None
                        self.params[i].copy_(m)
        finally:
            if hasattr(inner, "grad_scale"):
                del inner.grad_scale
            self._folded = False

    def _grad_slot(self, offset: int, master: torch.Tensor) -> torch.Tensor:
        need = max(self.CHUNK_NUMEL, max(self._numels))
        if self._buffer is None or self._buffer.numel() < need or self._buffer.device != master.device:
            self._buffer = torch.empty(need, dtype=torch.float32, device=master.device)
        return self._buffer[offset: offset + master.numel()].view_as(master)

    def restore_fp32(self, model: torch.nn.Module) -> None:
        """Make the model fp32 again with the master weights (exact), e.g. before saving it."""
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.float()
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
