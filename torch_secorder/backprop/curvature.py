"""The per-sample curvature carried from the loss down through the layers.

At the output of a module, with its per-sample features flattened to D, the
Hessian of the loss for sample n is one of

    factored:  H_n = S_n^T diag(signs_n) S_n + diag(d_n)     S (N, V, D), signs (N, V) or all +1, d (N, D)
    dense:     H_n                                          (N, D, D)

Factor columns are stored column-major per sample, (N, V, D): Linear maps act on the last
axis and Conv/pooling transposes fold (N, V) into one batch axis, both without copies.

Below a max pooling whose windows do not overlap, the factors may stay on the pooled grid:
`selection` = (indices (N, C, Q), positions per channel) says where each of the Q values of
channel c sits. Elementwise scaling and the convolution weight diagonal work on that compact
form (a quarter of the work after 2x2 pooling); reading `factors` materialises it.

Factors are cheap while V is small (V = C classes after cross-entropy, and
ReLU/pooling keep V); smooth activations add a diagonal d, which stays a
diagonal until a mixing layer (Linear, Conv, average pooling) turns it into D
more columns or a dense matrix. Rules choose the cheaper form per layer, so the
width never grows like depth squared (BackPACK adds 2 D columns per smooth
activation instead).
"""

import torch

from .. import ops
from .._errors import Unsupported


class Curvature:
    def __init__(self, feature_shape, factors=None, signs=None, diag=None, dense=None, primary=True, selection=None):
        assert dense is None or (factors is None and diag is None), "dense excludes factors and diag"
        self.feature_shape = tuple(feature_shape)
        self._factors, self.signs, self.diag, self.dense = factors, signs, diag, dense
        self.selection = selection if factors is not None else None
        # When the curvature is split into column pieces that go down one by one, terms that
        # arise further down (residuals of curved activations) belong to one piece only: the primary.
        self.primary = primary

    def _like(self, feature_shape=None, **parts):
        shape = self.feature_shape if feature_shape is None else feature_shape
        return Curvature(shape, primary=self.primary, **parts)

    @property
    def factors(self):
        """The factor columns (N, V, D), scattered from the compact form if there is one (a new tensor at every
        read then: read it once; the curvature itself never changes form)."""
        if self.selection is not None:
            indices, positions = self.selection
            return scatter_selected(self._factors, indices, positions)
        return self._factors

    def with_full_factors(self):
        """The same curvature with its factors scattered off the selection once (for rules that read them often)."""
        if self.selection is None:
            return self
        return self._like(factors=self.factors, signs=self.signs, diag=self.diag)

    @property
    def has_factors(self):
        return self._factors is not None

    @property
    def compact_factors(self):
        """The factors as stored: (N, V, C * Q) on the selected positions when `selection` is set."""
        return self._factors

    def sample(self, index):
        """The curvature of one sample (index:index + 1), in the same form."""

        def one(tensor):
            return None if tensor is None else tensor[index : index + 1]

        selection = None if self.selection is None else (one(self.selection[0]), self.selection[1])
        return Curvature(
            self.feature_shape,
            one(self._factors),
            one(self.signs),
            one(self.diag),
            one(self.dense),
            self.primary,
            selection,
        )

    # ------------------------------------------------------------------ shape
    @property
    def samples(self):
        for tensor in (self._factors, self.diag, self.dense):
            if tensor is not None:
                return tensor.shape[0]
        return 0

    @property
    def width(self):
        """Columns of the factor part (0 when there is none)."""
        return 0 if self._factors is None else self._factors.shape[1]

    def reshaped(self, feature_shape):
        """Same curvature, features seen with another per-sample shape (Flatten and friends)."""
        if tuple(feature_shape) == self.feature_shape:
            return self
        return self._like(feature_shape, factors=self.factors, signs=self.signs, diag=self.diag, dense=self.dense)

    # ------------------------------------------------------------------ reading
    def full_diagonal(self):
        """diag(H_n) for every sample, (N, D): the factors' and the dense part's share plus the diagonal part."""
        if self.dense is not None:
            return torch.diagonal(self.dense, dim1=1, dim2=2)
        total = None
        if self.selection is not None:  # windows do not overlap: squares can be scattered
            indices, positions = self.selection
            compact = factor_diagonal(self._factors, self.signs).unsqueeze(1)
            total = scatter_selected(compact, indices, positions)[:, 0]
        elif self._factors is not None:
            total = factor_diagonal(self._factors, self.signs)
        if self.diag is not None:
            total = self.diag if total is None else total + self.diag
        return total

    def signed_factor_chunks(self, max_columns):
        """(S, signs) chunks of at most max_columns columns whose signed sum is H (the dense
        part through an eigendecomposition, the diagonal part as scaled unit columns)."""
        if self.dense is not None:
            eigenvalues, eigenvectors = symmetric_eigen(self.dense)  # H = Q diag(l) Q^T
            columns = (eigenvectors * eigenvalues.abs().sqrt().unsqueeze(1)).transpose(1, 2).to(self.dense.dtype)
            yield from _split(columns, torch.sign(eigenvalues).to(self.dense.dtype), max_columns)
            return
        if self._factors is not None:
            yield from _split(self.factors, self.signs, max_columns)
        if self.diag is not None:
            yield from diagonal_columns(self.diag, max_columns)

    def column_parts(self):
        """Everything but the diagonal part as signed columns: the factors, or the dense part's eigen-columns
        (for rules that read the diagonal part on its own)."""
        if self.dense is not None:
            yield from self.signed_factor_chunks(1 << 62)
        elif self.width:
            yield self.factors, self.signs

    def factor_chunks(self, max_columns):
        """The factor part alone, in column chunks."""
        return _split(self.factors, self.signs, max_columns)

    # ------------------------------------------------------------------ transforming
    def scaled(self, jacobian):
        """J^T H J for an elementwise Jacobian J = diag(jacobian), jacobian (N, D).

        Without autograd the factors are scaled in place: each curvature is consumed once, and the
        factors are the largest tensors the engine holds."""
        if self.selection is not None:
            indices, positions = self.selection
            samples = jacobian.shape[0]
            picked = jacobian.reshape(samples, indices.shape[1], positions).gather(2, indices).reshape(samples, 1, -1)
            compact = self._factors.mul_(picked) if not torch.is_grad_enabled() else self._factors * picked
            diag = None if self.diag is None else self.diag * jacobian * jacobian
            return self._like(factors=compact, signs=self.signs, diag=diag, selection=self.selection)
        if self.dense is None and self._factors is not None and not torch.is_grad_enabled():
            self._factors.mul_(jacobian.unsqueeze(1))
            diag = None if self.diag is None else self.diag * jacobian * jacobian
            return self._like(factors=self._factors, signs=self.signs, diag=diag)
        if self.dense is not None:
            return self._like(dense=jacobian.unsqueeze(2) * self.dense * jacobian.unsqueeze(1))
        factors = None if self._factors is None else self._factors * jacobian.unsqueeze(1)
        diag = None if self.diag is None else self.diag * jacobian * jacobian
        return self._like(factors=factors, signs=self.signs, diag=diag)

    def plus_residual(self, residual):
        """H + diag(residual), residual (N, D), on the primary piece only (see primary)."""
        if not self.primary:
            return self
        if self.dense is not None:
            return self._like(dense=self.dense + torch.diag_embed(residual))
        diag = residual if self.diag is None else self.diag + residual
        return self._like(factors=self._factors, signs=self.signs, diag=diag, selection=self.selection)

    def to_dense(self):
        if self.dense is not None:
            return self.dense
        dense = None
        if self._factors is not None:
            factors = self.factors
            weighted = factors if self.signs is None else factors * self.signs.unsqueeze(2)
            dense = weighted.transpose(1, 2) @ factors
        if self.diag is not None:
            dense = torch.diag_embed(self.diag) if dense is None else dense + torch.diag_embed(self.diag)
        return dense


def symmetric_eigen(matrices):
    """(eigenvalues, eigenvectors) of symmetric (..., D, D) matrices, in float64 whatever their dtype: float32's
    eigh fails to converge on some per-sample second-order terms and is less accurate. Raises Unsupported if
    it still does not converge."""
    try:
        return torch.linalg.eigh(matrices.double())
    except torch.linalg.LinAlgError as error:
        raise Unsupported(f"a dense second-order term whose eigendecomposition does not converge ({error})") from None


def index_chunks(indices, step):
    """indices (K, ...) in chunks of at most step (at least one) rows."""
    step = max(1, step)
    for start in range(0, indices.shape[0], step):
        yield indices[start : start + step]


def eigen_columns(matrices, floor, max_columns, dtype):
    """Signed columns of symmetric blocks (N, B, s, s) by their eigendecomposition (in float64): per chunk of at
    most max_columns (block, eigenvector) pairs whose |eigenvalue| exceeds floor(|eigenvalues|) (N, B, s) in some
    sample, (blocks (V,), columns (N, V, s) scaled by sqrt|eigenvalue|, signs (N, V)), in dtype."""
    eigenvalues, eigenvectors = symmetric_eigen(matrices)
    del matrices
    magnitude = eigenvalues.abs()
    kept = (magnitude > floor(magnitude)).any(0).nonzero()  # (block, eigenvector) pairs
    scaled = (eigenvectors * magnitude.sqrt().unsqueeze(2)).to(dtype)  # column k of block b: [n, b, :, k]
    signs = torch.sign(eigenvalues).to(dtype)
    del eigenvalues, eigenvectors, magnitude
    for chunk in index_chunks(kept, max_columns):
        block, k = chunk.unbind(1)
        yield block, scaled.permute(1, 3, 0, 2)[block, k].transpose(0, 1), signs[:, block, k]


def columns_within(samples, features, itemsize, memory_budget):
    """How many columns of `features` per sample fit memory_budget (4 copies in flight: in, out, temporaries)."""
    return max(1, memory_budget // max(1, 4 * samples * features * itemsize))


def factor_diagonal(factors, signs):
    """sum_v signs[n, v] * factors[n, v, d]^2: (N, D)."""
    return ops.factor_diagonal(factors, signs)


def scatter_selected(compact, indices, positions):
    """(N, V, C * Q) values on selected positions -> (N, V, C * positions), zeros elsewhere: J^T for the
    selection J of a max pooling (values that overlapping windows put on one position add up)."""
    samples, width = compact.shape[:2]
    channels = indices.shape[1]
    full = compact.new_zeros(width, samples, channels, positions)  # (V, N, ...) like the other transposes
    full.scatter_add_(
        3, indices.unsqueeze(0).expand(width, -1, -1, -1), compact.transpose(0, 1).reshape(width, samples, channels, -1)
    )
    return full.reshape(width, samples, -1).transpose(0, 1)


def diagonal_columns(diag, max_columns):
    """diag(d_n) = sum_j sign(d_nj) (sqrt|d_nj| e_j)(sqrt|d_nj| e_j)^T, in column chunks."""
    samples, features = diag.shape
    root, sign = diag.abs().sqrt(), torch.sign(diag)
    for start in range(0, features, max_columns):
        stop = min(features, start + max_columns)
        columns = diag.new_zeros(samples, stop - start, features)
        index = torch.arange(stop - start, device=diag.device)
        columns[:, index, start + index] = root[:, start:stop]
        yield columns, sign[:, start:stop]


def balanced_squares(left, right, signs):
    """A signed pair s (l r^T + r l^T) as two signed squares, s/2 (b l + r/b)(...)^T - s/2 (b l - r/b)(...)^T,
    b = sqrt(|r| / |l|) per column so that the two halves have one length. left / right: {input position:
    (N, V, ...)} (a position missing from one side is zero there), signs (N, V). Returns ({position:
    (N, 2V, ...)}, signs (N, 2V)). Exact, but below a map J that grows J r far beyond J l the two squares
    cancel: where it can, the graph engine keeps the product 2 s (J l)(J r) instead."""
    positions = sorted(set(left) | set(right))

    def norms(side):
        return sum(side[p].flatten(2).square().sum(dim=2) for p in positions if p in side)

    length_l, length_r = norms(left), norms(right)
    tiny = torch.finfo(signs.dtype).tiny
    usable = (length_l > 0) & (length_r > 0)
    balance = torch.where(usable, (length_r.sqrt() / length_l.sqrt().clamp_min(tiny)).sqrt(), torch.ones_like(signs))
    squares = {}
    for p in positions:
        some = left.get(p, right.get(p))
        shape = (*balance.shape, *[1] * (some.dim() - 2))
        scaled_l = left[p] * balance.reshape(shape) if p in left else torch.zeros_like(some)
        scaled_r = right[p] / balance.reshape(shape) if p in right else torch.zeros_like(some)
        squares[p] = torch.cat([scaled_l + scaled_r, scaled_l - scaled_r], dim=1) * 0.5**0.5
    return squares, torch.cat([signs, -signs], dim=1)


def _split(factors, signs, max_columns):
    width = factors.shape[1]
    if width <= max_columns:
        yield factors, signs
        return
    for start in range(0, width, max_columns):
        stop = min(width, start + max_columns)
        yield factors[:, start:stop], None if signs is None else signs[:, start:stop]


def concat_factors(parts):
    """Joins (S, signs) parts along the columns; signs become explicit if any part has them."""
    if len(parts) == 1:
        return parts[0]
    factors = torch.cat([s for s, _ in parts], dim=1)
    if all(signs is None for _, signs in parts):
        return factors, None
    signs = torch.cat(
        [torch.ones(s.shape[0], s.shape[1], dtype=s.dtype, device=s.device) if g is None else g for s, g in parts],
        dim=1,
    )
    return factors, signs
