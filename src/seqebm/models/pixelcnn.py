"""PixelCNN and Gated PixelCNN over small grey-level images, as raster-order token sequences.

Notation (shape comments):
    B batch, T input length (BOS + pixels), S tokens fed to one ``step`` call,
    H = W = side (image height/width), N = side * side pixels, L = levels (intensity values),
    C channels.

Protocol mapping (see :mod:`seqebm.models.base`):

* output vocabulary ``vocab_size = levels``; the *input* vocabulary has one more symbol,
  ``bos_id = levels``, which is never predicted;
* ``tokens[:, 0] == bos_id`` and ``tokens[:, 1 + i]`` is pixel ``i`` in raster order, so
  ``logits[:, t]`` is the distribution of pixel ``t`` given pixels ``< t``;
* ``max_len = side * side``: the longest input is BOS + pixels ``0 .. N - 2`` and yields the
  logits of all ``N`` pixels (the last pixel is a target only, it is never fed in).

References:
    A. van den Oord, N. Kalchbrenner, K. Kavukcuoglu. "Pixel Recurrent Neural Networks".
    ICML 2016 (masked convolutions, mask types A and B).
    A. van den Oord, N. Kalchbrenner, O. Vinyals, L. Espeholt, A. Graves, K. Kavukcuoglu.
    "Conditional Image Generation with PixelCNN Decoders". NeurIPS 2016 (gated units,
    vertical + horizontal stacks without blind spot).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.base import check_tokens, select_batch_rows

__all__ = ["PixelState", "PixelCNN", "GatedPixelCNN", "MaskedConv2d"]


class PixelState(NamedTuple):
    """Incremental state: the pixels written so far and how many input tokens were consumed.

    ``canvas`` is ``(B, H, W)`` long (unwritten positions hold 0; the masks never read them);
    ``pos`` is the number of input tokens (BOS included) fed so far, shared by all rows.
    """

    canvas: Tensor
    pos: int


class _PixelModel(nn.Module):
    """Shared protocol glue: canvas construction, validation, ``step`` and ``select_state``.

    Subclasses implement :meth:`canvas_logits` ``(B, H, W) long -> (B, L, H, W)``.
    """

    def __init__(self, levels: int, side: int) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        if side < 1:
            raise ValueError(f"side must be >= 1, got {side}")
        self.levels = levels
        self.side = side
        self.vocab_size: int = levels
        self.bos_id: int = levels
        self.max_len: int | None = side * side

    def canvas_logits(self, canvas: Tensor) -> Tensor:  # (B, H, W) -> (B, L, H, W)
        raise NotImplementedError

    # ------------------------------------------------------------------ validation
    def _check(self, tokens: Tensor, offset: int) -> None:
        """Validate ``tokens`` that occupy input positions ``offset .. offset + S - 1``."""
        check_tokens(tokens, self.levels + 1, None)
        n = self.side * self.side
        if offset + tokens.shape[1] > n:
            raise ValueError(
                f"PixelCNN input of length {offset + tokens.shape[1]} exceeds max_len={n} "
                f"(BOS + the first {n - 1} pixels of a {self.side}x{self.side} image)"
            )
        if tokens.shape[1] == 0:
            raise ValueError("tokens must contain at least one position, got shape "
                             f"{tuple(tokens.shape)}")
        if offset == 0 and bool((tokens[:, 0] != self.bos_id).any()):
            raise ValueError(
                f"tokens[:, 0] must be the BOS symbol {self.bos_id} (= levels); "
                f"got {tokens[:, 0].unique().tolist()}"
            )
        pixels = tokens[:, 1:] if offset == 0 else tokens
        if pixels.numel() and bool((pixels >= self.levels).any()):
            raise ValueError(
                f"pixel tokens must lie in [0, {self.levels}); BOS={self.bos_id} may only appear "
                "at position 0"
            )

    # ------------------------------------------------------------------ full forward
    def forward(self, tokens: Tensor) -> Tensor:
        """Teacher-forced logits.

        Args:
            tokens: ``(B, T)`` with ``T <= N``; ``tokens[:, 0] = bos_id``, ``tokens[:, 1:]`` are
                pixels ``0 .. T - 2`` in raster order.
        Returns:
            ``(B, T, L)`` logits; ``logits[:, t]`` is the distribution of pixel ``t``.
        """
        self._check(tokens, 0)
        b, t = tokens.shape
        n = self.side * self.side
        flat = tokens.new_zeros(b, n, dtype=torch.long)
        flat[:, : t - 1] = tokens[:, 1:].long()
        logits = self.canvas_logits(flat.view(b, self.side, self.side))  # (B, L, H, W)
        return logits.flatten(2).transpose(1, 2)[:, :t]  # (B, N, L) -> (B, T, L)

    # ------------------------------------------------------------------ incremental
    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> PixelState:
        """Empty canvas ``(B, H, W)`` and ``pos = 0`` (the next token fed must be BOS)."""
        canvas = torch.zeros(batch_size, self.side, self.side, dtype=torch.long, device=device)
        return PixelState(canvas, 0)

    def step(self, tokens: Tensor, state: PixelState) -> tuple[Tensor, PixelState]:
        """Feed ``tokens`` ``(B, S)`` (input positions ``pos .. pos + S - 1``).

        Returns ``(B, S, L)`` logits equal to ``forward`` on the concatenated tokens, and a new
        state (the input state is not modified, so it may be reused). The whole network is
        recomputed on the canvas, which is cheap for 8x8 images; masks guarantee that the
        not-yet-written positions (zeros) never influence the returned logits.
        """
        self._check(tokens, state.pos)
        b, s = tokens.shape
        if b != state.canvas.shape[0]:
            raise ValueError(f"step got batch {b} but the state holds {state.canvas.shape[0]} rows")
        n = self.side * self.side
        flat = state.canvas.reshape(b, n).clone()
        start = state.pos
        pixels = tokens[:, 1:] if start == 0 else tokens  # BOS is never written
        first_pixel = max(start - 1, 0)
        flat[:, first_pixel : first_pixel + pixels.shape[1]] = pixels.to(flat.device).long()
        canvas = flat.view(b, self.side, self.side)
        logits = self.canvas_logits(canvas).flatten(2).transpose(1, 2)  # (B, N, L)
        return logits[:, start : start + s], PixelState(canvas, start + s)

    def select_state(self, state: PixelState, index: Tensor) -> PixelState:
        """Gather rows ``index`` (repeats allowed) of the canvas; ``pos`` is shared."""
        return select_batch_rows(state, index)


class MaskedConv2d(nn.Conv2d):
    """Square masked convolution (van den Oord et al., 2016a, Fig. 2).

    Output ``(i, j)`` sees the rows above and the pixels left of ``j`` in row ``i``; mask type
    ``"B"`` also sees ``(i, j)`` itself, type ``"A"`` (first layer only) does not.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, mask_type: str) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        c = kernel_size // 2
        mask = torch.zeros(kernel_size, kernel_size)
        mask[:c] = 1.0
        mask[c, : c + (1 if mask_type == "B" else 0)] = 1.0
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class PixelCNN(_PixelModel):
    """PixelCNN (van den Oord et al., 2016a): masked-convolution residual stack.

    Embedding ``L -> C`` of each pixel, a type-A masked conv (``first_kernel_size``), then
    ``n_layers - 1`` residual blocks ``x + conv_B(relu(x))`` (``kernel_size``), and a two-layer
    1x1 head to ``L`` logits. The stacked masks are causal but leave the well-known blind spot
    to the upper right; :class:`GatedPixelCNN` removes it.

    Args:
        levels: number of intensity values ``L`` (output vocabulary).
        side: image side ``H = W``.
        channels: hidden width ``C``.
        n_layers: number of masked conv layers (>= 1).
        kernel_size: kernel of the type-B layers (odd).
        first_kernel_size: kernel of the type-A layer (odd).
        dropout: dropout probability inside residual blocks.
    """

    def __init__(
        self,
        levels: int = 17,
        side: int = 8,
        channels: int = 64,
        n_layers: int = 5,
        kernel_size: int = 3,
        first_kernel_size: int = 5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(levels, side)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.embed = nn.Embedding(levels, channels)
        self.first = MaskedConv2d(channels, channels, first_kernel_size, "A")
        self.blocks = nn.ModuleList(
            MaskedConv2d(channels, channels, kernel_size, "B") for _ in range(n_layers - 1)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, levels, 1)
        )

    def canvas_logits(self, canvas: Tensor) -> Tensor:
        """``(B, H, W)`` long pixel values -> ``(B, L, H, W)`` logits."""
        x = self.embed(canvas).permute(0, 3, 1, 2)  # (B, C, H, W)
        x = self.first(x)
        for conv in self.blocks:
            x = x + self.dropout(conv(F.relu(x)))
        return self.head(x)


def _gate(x: Tensor) -> Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` on the channel halves: ``(B, 2C, ...) -> (B, C, ...)``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack (van den Oord et al., 2016b, Fig. 2).

    * vertical conv: kernel ``(k // 2 + 1, k)`` over rows ``i - k//2 .. i`` (all columns within
      ``k//2``); its pre-activations are shifted down one row before entering the horizontal
      stack, so the horizontal stack at row ``i`` only sees rows ``< i`` through it;
    * horizontal conv: kernel ``(1, k // 2 + 1)`` over columns ``j - k//2 .. j`` of row ``i``; in
      the first layer (``mask_type="A"``) its input is shifted right one column so the current
      pixel is excluded, and the residual connection is dropped (it would leak the pixel).
    """

    def __init__(self, channels: int, kernel_size: int, mask_type: str, dropout: float) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        self.k = kernel_size
        self.first = mask_type == "A"
        half = kernel_size // 2
        self.v_conv = nn.Conv2d(channels, 2 * channels, (half + 1, kernel_size))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, half + 1))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``v, h``: ``(B, C, H, W)`` -> new ``v, h`` of the same shape."""
        half = self.k // 2
        # Vertical stack: pad top (half rows) and both sides, none at the bottom.
        v_pre = self.v_conv(F.pad(v, (half, half, half, 0)))  # (B, 2C, H, W)
        # Shift down by one row so row i of the horizontal stack only sees rows < i.
        v_shift = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1, :]
        h_in = F.pad(h, (1, 0))[:, :, :, :-1] if self.first else h  # exclude current pixel
        h_pre = self.h_conv(F.pad(h_in, (half, 0))) + self.v_to_h(v_shift)  # (B, 2C, H, W)
        h_new = self.h_out(self.dropout(_gate(h_pre)))
        if not self.first:
            h_new = h + h_new
        return _gate(v_pre), h_new


class GatedPixelCNN(_PixelModel):
    """Gated PixelCNN (van den Oord et al., 2016b): vertical + horizontal stacks, no blind spot.

    Embedding ``L -> C`` feeds both stacks; layer 0 uses ``first_kernel_size`` and the type-A
    horizontal shift, layers ``1 .. n_layers - 1`` use ``kernel_size`` with residual connections
    in the horizontal stack; a two-layer 1x1 head maps the horizontal stack to ``L`` logits.

    Args:
        levels: number of intensity values ``L`` (output vocabulary).
        side: image side ``H = W``.
        channels: hidden width ``C``.
        n_layers: number of gated layers (>= 1).
        kernel_size: kernel of layers after the first (odd).
        first_kernel_size: kernel of the first layer (odd).
        dropout: dropout probability on the gated horizontal activations.
    """

    def __init__(
        self,
        levels: int = 17,
        side: int = 8,
        channels: int = 64,
        n_layers: int = 5,
        kernel_size: int = 3,
        first_kernel_size: int = 5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(levels, side)
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.embed = nn.Embedding(levels, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, first_kernel_size if i == 0 else kernel_size,
                       "A" if i == 0 else "B", dropout)
            for i in range(n_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, levels, 1)
        )

    def canvas_logits(self, canvas: Tensor) -> Tensor:
        """``(B, H, W)`` long pixel values -> ``(B, L, H, W)`` logits."""
        x = self.embed(canvas).permute(0, 3, 1, 2)  # (B, C, H, W)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)
