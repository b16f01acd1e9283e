"""The SAE interface every architecture implements (docs/ARCHITECTURE.md, "SAEs").

    pre = (x - b_dec) @ W_enc + b_enc          encoder pre-activations
    f   = activation(pre)                      codes (architecture specific)
    x̂   = f @ W_dec + b_dec                    linear decoder, rows of W_dec = feature directions

`forward(x, pos, mask)` returns `SAEOutput(x_hat, f, pre, extras)`; `pos` [B, T] are the
true token positions and `mask` [B, T] the tokens that count, both ignored by
position-agnostic architectures. How to add one: docs/ARCHITECTURE.md, "Adding a method".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from posae.sae.sparse import SparseCodes, centred_affine, linear_decode, selected_pre_activations


def per_position(table: Tensor, pos: Tensor) -> Tensor:
    """table[pos] for a [L, ...] table and [B, T] positions. When every row holds the same
    positions (whole sequences), one row is gathered and broadcast instead of B."""
    if pos.dim() == 2 and pos.shape[0] > 1 and bool((pos == pos[:1]).all()):
        return table[pos[:1]]
    return table[pos]


@dataclass
class SAEConfig:
    """Fields every architecture shares; subclasses add their own."""

    # The variant's name (posae/conf/variant/<name>.yaml); also its architecture unless set.
    name: str
    # Registry key of the architecture, when a paper variant reuses one (tc_sae -> relu).
    architecture: Optional[str] = None
    d_in: int = 0
    expansion_factor: int = 8
    # Explicit number of latents; overrides expansion_factor when set.
    width: Optional[int] = None
    # Unit-norm decoder rows, with the gradient component parallel to each row removed.
    normalize_decoder: bool = True
    # tied: W_enc = W_dec^T | kaiming_uniform (003: Kaiming-uniform encoder)
    encoder_init: str = "tied"
    # normal: random unit rows | orthogonal (003, 004) | standard_normal: N(0, 1) entries,
    # rows not normalised (the Temporal SAE's, 2511.01836 code)
    decoder_init: str = "normal"

    @property
    def d_sae(self) -> int:
        return self.width or self.expansion_factor * self.d_in

    def validate(self) -> None:
        """Raise ConfigError naming the `variant.` key when the architecture cannot be built
        with these values; called when the config is read, before any compute."""

    @property
    def arch(self) -> str:
        return self.architecture or self.name


@dataclass
class PositionalConfig(SAEConfig):
    """Architectures with per-position state need the context length L."""

    context_size: int = 128


def position_range(pos: Tensor, n_ranges: int, context_size: int) -> Tensor:
    """Index of the equal position range (of `n_ranges` over the context) each position is in."""
    return (pos * n_ranges // context_size).clamp(0, n_ranges - 1)


@dataclass(init=False)
class SAEOutput:
    """What `SAE.forward` returns: x_hat, the codes f, the encoder's pre-activations and
    the extras loss terms read. f may arrive as `SparseCodes` (TopK-family training): then
    `sparse_codes` holds them and the dense f is built on first read. A dataclass, so that
    data parallelism finds its tensors (DDP's search for unused parameters walks
    dataclasses, not plain objects)."""

    x_hat: Tensor
    pre: Tensor
    extras: dict[str, Tensor]
    sparse_codes: SparseCodes | None
    _f: Tensor | None

    def __init__(self, x_hat: Tensor, f: Tensor | SparseCodes, pre: Tensor,
                 extras: dict[str, Tensor] | None = None):
        self.x_hat, self.pre = x_hat, pre
        self.extras = {} if extras is None else extras
        self.sparse_codes = f if isinstance(f, SparseCodes) else None
        self._f = None if self.sparse_codes is not None else f

    @property
    def f(self) -> Tensor:
        if self._f is not None:
            return self._f
        f = self.sparse_codes.to_dense()
        if torch.is_grad_enabled() or not self.sparse_codes.values.requires_grad:
            self._f = f  # a first read under no_grad must not cache codes without a graph
        return f

    def codes_of(self, tokens: Tensor) -> Tensor:
        """[len(tokens), m]: the codes of the distinct `tokens` (indices into f flattened to
        [tokens, m]), from the triples when the dense f is not built yet."""
        if self._f is None:
            return self.sparse_codes.dense_rows(tokens)
        return self._f.reshape(-1, self._f.shape[-1])[tokens]

    @property
    def input_codes(self) -> Tensor:
        """The codes the input produces, before any input-independent offset (the
        hierarchical SAE's g ⊙ α_t, which would make its positional half fire on every
        token): what L0, firing and dead latents count, in training (and so the
        matched-sparsity controller) as in evaluation."""
        return self.extras.get("input_codes", self.f)

    def active_codes(self, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(number of active input codes on the tokens `mask` [B, T] counts, [m] bool: the
        latent fired on one of them); from `sparse_codes` without building the dense f."""
        codes = self.sparse_codes
        if codes is not None and "input_codes" not in self.extras:
            on = ((codes.values.detach() != 0) & mask.reshape(-1)[codes.tokens]).int()
            fired = on.new_zeros(codes.shape[-1]).index_add_(0, codes.latents, on) > 0
            return on.sum(), fired  # no boolean indexing: no host sync on a GPU
        active = self.input_codes.detach() != 0
        active &= mask[..., None]
        return torch.count_nonzero(active), active.flatten(0, -2).any(0)  # bool .sum() is slow


class SAE(nn.Module):
    """An architecture implements `encode_with_pre` (and `decode` when its decoder is not
    the linear one); `forward` and `encode` derive from it. Per-step state (a schedule, or
    statistics of the last step) lives in the `StepHook`s `step_hooks` returns, which the
    trainer drives (posae/training/hooks.py)."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # Keys this architecture's forward puts in `SAEOutput.extras`; a loss term that reads
    # one (`LossTerm.requires`) is refused at config time with an architecture lacking it.
    provides: ClassVar[frozenset[str]] = frozenset()
    # The codes depend on the token's position: forward and encode refuse pos=None.
    needs_positions: ClassVar[bool] = False
    # Has its own encoder (W_enc, b_enc) that dead-latent resampling can rewrite.
    resamplable: ClassVar[bool] = True
    # The default decode may read f's non-zero entries alone (posae.sae.sparse): true only
    # where no parameter, hook or statistic reads ∂L/∂f at f = 0 (docs/ARCHITECTURE.md,
    # "Sparse steps"); a new architecture decodes densely until it says so.
    decodes_sparsely: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        if cfg.decoder_init == "orthogonal":
            W_dec = nn.init.orthogonal_(torch.empty(d_sae, d_in))
        else:
            W_dec = torch.randn(d_sae, d_in)
            if cfg.decoder_init == "normal":
                W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.encoder_init == "kaiming_uniform":
            W_enc = nn.init.kaiming_uniform_(torch.empty(d_sae, d_in), a=5 ** 0.5).t()
        else:
            W_enc = W_dec.t()
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_enc.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode_with_pre(self, x: Tensor, pos: Tensor | None,
                        mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(codes f, dense or as `SparseCodes`; encoder pre-activations; extras): the one
        method an architecture implements. `pos` [B, T] are the true token positions
        (never None when `needs_positions`), `mask` [B, T] the tokens that count; extras
        hold what loss terms read (`provides`)."""
        raise NotImplementedError

    def decode(self, f: Tensor | SparseCodes, extras: dict[str, Tensor] | None = None) -> Tensor:
        """x̂ = f W_dec + b_dec; from the triples when f is `SparseCodes`, and from f's
        non-zero entries when they are few and the architecture `decodes_sparsely`."""
        if isinstance(f, SparseCodes):
            return f.decode(self.W_dec) + self.b_dec
        if self.decodes_sparsely:
            return linear_decode(f, self.W_dec) + self.b_dec
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, pos: Tensor | None = None,
                mask: Tensor | None = None) -> SAEOutput:
        self.check_positions(pos)
        f, pre, extras = self.encode_with_pre(x, pos, mask)
        return SAEOutput(self.decode(f, extras), f, pre, extras)

    def encode(self, x: Tensor, pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        self.check_positions(pos)
        f = self.encode_with_pre(x, pos, mask)[0]
        return f.to_dense() if isinstance(f, SparseCodes) else f

    def check_positions(self, pos: Tensor | None) -> None:
        if pos is None and self.needs_positions:
            raise ValueError(f"the {type(self).__name__} ({self.cfg.name}) needs token "
                             f"positions: pass pos")

    def pre_activations(self, x: Tensor) -> Tensor:
        """(x - b_dec) W_enc + b_enc, the shared encoder (its weight gradient sparse-aware:
        posae.sae.sparse.CentredAffine)."""
        return centred_affine(x, self.b_dec, self.W_enc, self.b_enc)

    def selected_codes(self, x: Tensor, pre: Tensor, tokens: Tensor,
                       latents: Tensor) -> SparseCodes:
        """The ReLU'd pre-activations at chosen (token, latent) pairs as `SparseCodes`,
        differentiable in the encoder through the sparse backward
        (posae.sae.sparse.SelectedPreActivations): TopK-family codes."""
        values = selected_pre_activations(x, self.b_dec, self.W_enc, self.b_enc, pre,
                                          tokens, latents)
        return SparseCodes(tokens, latents, torch.relu(values), pre.shape)

    def leaves_parameters_unused(self) -> bool:
        """Whether some parameter may get no gradient in a step (an idle adapter, a switched
        off mask), so that data parallelism must look for unused parameters (slower)."""
        return False

    def step_hooks(self) -> list:
        """The `StepHook`s that move this architecture's per-step state; default none."""
        return []

    def mechanism_state(self) -> dict[str, float]:
        """Scalars that show whether this architecture's own mechanisms move (mask
        statistics, adaptive rates, routing norm, curriculum α), logged as `mech/<name>`
        at each log step and kept in train_summary.json. Default: none."""
        return {}

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale each feature's own decoder vector (a row of W_dec) to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out of each row's gradient its component along that (unit) row."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on `scale * x` act on raw x with identical codes.

        pre = (s x - b) W + c = (x - b/s)(s W) + c, and x̂ = (f W_dec + b)/s.
        """
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale
