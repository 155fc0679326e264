"""The thesis repo's downsamplers as modules (params and the plan side in :mod:`hfactory.spec.thesis`).

Source: leognk/HierarchicalTransformers @ 17d81f6, ``models/encoders/metaformer.py``
(``KernelPooling``, ``SpatialMLPPooling``, ``GeMePooling`` + ``GreedyMerging``,
``Attention0Pooling`` + ``AttentionAggregate``); attribute names follow it where it has them
(``norm``, ``pool``, ``norm1``, ``spatial_proj``, ``norm2``, ``channel_proj``, ``to_kv``,
``proj``). Written from the behaviour of leognk/HierarchicalTransformers @ 17d81f6 (read, not copied).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .downsample import build_norm, copy_norm
from .feedforward import StarReLU
from .hvt import as_seq
from .token_sizes import check_token_sizes, key_size_bias

__all__ = ["KernelPool", "SpatialPool", "GreedyMerging", "GeMePool", "greedy_merge_groups", "ClusterAttention",
           "Att0Clusters", "Att0Pool", "assign_aggregate", "hardmax_st", "att0"]


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class KernelPool(nn.Module):
    """Thesis ``KernelPooling``: ``norm`` over the input channels, then (``method``)
    ``conv``: ``Conv2d(C_in, C_out, k, s, p)``; ``avg`` / ``max``: ``Conv2d(C_in, C_out, 1)`` then
    ``AvgPool2d`` / ``MaxPool2d(k, s, p)``. ``frozen`` freezes the conv (``rand_conv``).
    ``(B, H, W, C_in) -> (B, H/s, W/s, C_out)`` (the plan checked the reduction is exact)."""

    def __init__(self, in_chs: int, out_chs: int, method: str, kernel_size: int, stride: int, padding: int,
                 norm: Optional[nn.Module] = None, frozen: bool = False, count_include_pad: bool = True):
        super().__init__()
        self.norm = build_norm(norm)
        if method == "conv":
            self.pool = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)
        else:
            window = (nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=count_include_pad)
                      if method == "avg" else nn.MaxPool2d(kernel_size, stride, padding))
            self.pool = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1), window)
        self.frozen = frozen
        if frozen:
            _freeze(self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SpatialPool(nn.Module):
    """Thesis ``SpatialMLPPooling``: ``norm1`` -> token-axis map ``spatial_proj`` (``N_in -> N_out``:
    a Linear, or with ``use_mlp`` ``Linear(N_in, N_out) -> StarReLU -> Linear(N_out, N_out)``; no
    biases; frozen with ``frozen``) -> ``norm2`` -> ``channel_proj`` ``Linear(C_in, C_out)``.
    ``(B, H, W, C_in) -> (B, H', W', C_out)`` with ``(H', W') = out_grid``.

    Raises:
        ValueError: the input grid is not the ``in_grid`` the weights were made for.
    """

    def __init__(self, in_chs: int, out_chs: int, in_grid: list[int], out_grid: list[int], use_mlp: bool = False,
                 frozen: bool = False, norm: Optional[nn.Module] = None):
        super().__init__()
        self.in_grid, self.out_grid = tuple(in_grid), tuple(out_grid)
        n_in, n_out = math.prod(in_grid), math.prod(out_grid)
        self.norm1 = build_norm(norm)
        if use_mlp:
            # thesis MLP(n_in, mlp_ratio=n_out/n_in, out_features=n_out): hidden int(ratio * n_in) = n_out
            self.spatial_proj = nn.Sequential(nn.Linear(n_in, n_out, bias=False), StarReLU(),
                                              nn.Linear(n_out, n_out, bias=False))
        else:
            self.spatial_proj = nn.Linear(n_in, n_out, bias=False)
        if frozen:
            _freeze(self.spatial_proj)
        self.norm2 = copy_norm(norm)
        self.channel_proj = nn.Linear(in_chs, out_chs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:3]) != self.in_grid:
            raise ValueError(f"this spatial downsampler maps exactly {self.in_grid[0]}x{self.in_grid[1]} tokens (its "
                             f"weights are sized for them), got {x.shape[1]}x{x.shape[2]}; run the model at the "
                             "img_size it was built for")
        b, _, _, c = x.shape
        x = self.norm1(x).reshape(b, -1, c).transpose(1, 2)  # (B, C, N_in)
        x = self.spatial_proj(x).transpose(1, 2).reshape(b, *self.out_grid, c)
        return self.channel_proj(self.norm2(x))


# --------------------------------------------------------------------------------- greedy merging


@torch.no_grad()
def greedy_merge_groups(keys: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group labels of greedy merging on key cosine similarity: ``(B, N, D) -> (B, N)`` int64 in
    ``[0, num_groups)``.

    The thesis's ``GreedyMerging`` sorts all token pairs by cosine similarity (descending) and,
    ``N - num_groups`` times, merges the groups of the best pair not already in one group. That
    is Kruskal's algorithm on the complete similarity graph stopped early, i.e. single-linkage
    clustering: its merges are exactly the ``N - num_groups`` heaviest edges of the maximum
    spanning tree (unique when similarities are distinct). This function computes it in that
    vectorised form: Prim's algorithm over the dense similarity matrix (``N - 1`` steps of
    ``O(B N)`` work, against the thesis's ``N - num_groups`` steps of ``O(B N^2)``), cut the
    ``num_groups - 1`` lightest tree edges, and label the components by pointer jumping
    (``ceil(log2 N)`` steps). With tied similarities both forms pick among equals arbitrarily;
    this one always yields exactly ``num_groups`` groups.

    Groups are numbered by their first token (smallest index): in raster order of first members.
    """
    b, n, _ = keys.shape
    if not 1 <= num_groups <= n:
        raise ValueError(f"num_groups must be in 1..{n}, got {num_groups}")
    k = F.normalize(keys.float(), dim=-1)
    sim = k @ k.transpose(1, 2)  # (B, N, N)
    batch = torch.arange(b, device=keys.device)
    # Prim from token 0: best[v] = heaviest edge from v to the tree, parent[v] its tree end.
    in_tree = torch.zeros(b, n, dtype=torch.bool, device=keys.device)
    in_tree[:, 0] = True
    best = sim[:, 0, :].clone()
    parent = torch.zeros(b, n, dtype=torch.long, device=keys.device)
    edge_w = torch.full((b, n), float("inf"), device=keys.device)  # root: never cut
    neg_inf = torch.tensor(float("-inf"), device=keys.device)
    for _ in range(n - 1):
        w, u = torch.where(in_tree, neg_inf, best).max(dim=1)
        in_tree[batch, u] = True
        edge_w[batch, u] = w
        row = sim[batch, u]  # (B, N)
        better = (row > best) & ~in_tree
        best = torch.where(better, row, best)
        parent = torch.where(better, u[:, None], parent)
    # Keep the N - num_groups heaviest tree edges: cut the num_groups - 1 lightest ones.
    up = parent.clone()
    up[:, 0] = 0
    if num_groups > 1:
        cut = edge_w.topk(num_groups - 1, dim=1, largest=False).indices  # nodes whose parent edge is cut
        up.scatter_(1, cut, cut)
    # Pointer jumping: every node reaches the top of its component.
    for _ in range(max(1, math.ceil(math.log2(n)))):
        up = up.gather(1, up)
    # Number components by their first (smallest) member.
    idx = torch.arange(n, device=keys.device).expand(b, n)
    first = torch.full((b, n), n, dtype=torch.long, device=keys.device).scatter_reduce(1, up, idx, "amin")
    order = first.argsort(dim=1)[:, :num_groups]  # representatives, by first member
    rank = torch.zeros(b, n, dtype=torch.long, device=keys.device).scatter_(
        1, order, torch.arange(num_groups, device=keys.device).expand(b, num_groups))
    return rank.gather(1, up)


class GreedyMerging(nn.Module):
    """Merge ``N`` tokens into ``num_groups`` (:func:`greedy_merge_groups` on the keys), each the
    size-weighted mean of its members' values: ``k, v (B, N, D), sizes (B, N) or None ->
    (B, num_groups, D), sizes (B, num_groups)``. Without incoming sizes every token counts 1, so
    outputs are plain means and sizes are member counts (the thesis's ``GreedyMerging``)."""

    def __init__(self, num_groups: int):
        super().__init__()
        self.num_groups = num_groups

    def forward(self, k: torch.Tensor, v: torch.Tensor, sizes: Optional[torch.Tensor] = None):
        labels = greedy_merge_groups(k, self.num_groups)
        b, n, d = v.shape
        w = torch.ones(b, n, dtype=v.dtype, device=v.device) if sizes is None else sizes.to(v.dtype)
        group_sizes = w.new_zeros(b, self.num_groups).scatter_add_(1, labels, w)
        sums = v.new_zeros(b, self.num_groups, d).scatter_add_(1, labels[..., None].expand(b, n, d), v * w[..., None])
        return sums / group_sizes[..., None], group_sizes


class GeMePool(nn.Module):
    """Thesis ``GeMePooling``: ``norm1 -> to_kv`` (``Linear(C_in, 2 C_in)``, no bias; keys the first
    half) -> :class:`GreedyMerging` -> ``norm2 -> proj`` (``Linear(C_in, C_out)``, no bias).
    ``(B, H, W, C_in)`` or ``(B, N, C_in)`` -> ``(B, N_out, C_out)`` (seq layout), returned with
    the group sizes ``(B, N_out)`` as token sizes: ``forward(x[, sizes]) -> (tokens, sizes)``
    (``emits_token_sizes``, :mod:`hfactory.layers.token_sizes`). With ``token_sizes_in`` the
    incoming tokens already had sizes ``(B, N)`` (an earlier merge), passed as ``sizes``
    (``takes_token_sizes``), which weight the means and add up.

    Raises:
        UsageError: ``token_sizes_in`` and no ``sizes`` of shape ``(B, N)``.
    """

    emits_token_sizes = True  # the token-sizes protocol (hfactory.layers.token_sizes)

    def __init__(self, in_chs: int, out_chs: int, in_tokens: int, out_tokens: int, norm: Optional[nn.Module] = None,
                 token_sizes_in: bool = False):
        super().__init__()
        self.takes_token_sizes = token_sizes_in
        self.norm1 = build_norm(norm)
        self.to_kv = nn.Linear(in_chs, 2 * in_chs, bias=False)
        self.merge = GreedyMerging(out_tokens)
        self.norm2 = copy_norm(norm)
        self.proj = nn.Linear(in_chs, out_chs, bias=False)

    def forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = as_seq(x)
        if self.takes_token_sizes:
            sizes = check_token_sizes(sizes, x.shape[0], x.shape[1], "the merging downsampler (geme)")
        else:
            sizes = None  # the tokens had no sizes: each counts once
        k, v = self.to_kv(self.norm1(x)).chunk(2, dim=-1)
        x, sizes = self.merge(k, v, sizes)
        return self.proj(self.norm2(x)), sizes


# ----------------------------------------------------------------------------- Attention0Pooling


def hardmax_st(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Straight-through hardmax (thesis ``hardmax``): the one-hot of the argmax in the forward
    pass, the gradient of ``probs`` in the backward pass."""
    hard = torch.zeros_like(probs).scatter_(dim, probs.argmax(dim, keepdim=True), 1.0)
    return hard - probs.detach() + probs


def assign_aggregate(q_c: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, eps: float,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Clusters aggregate tokens with an assignment over the *clusters* (thesis ``soft`` /
    ``hard``): ``P[t, c] = softmax_c(k_t . q_c / sqrt(D))`` (hardmax for ``hard``), then each
    cluster averages the values with weights ``P[:, c] / (sum_t P[t, c] + eps)``.

    ``q_c`` ``(B, H, K, D)``, ``k``/``v`` ``(B, H, N, D)`` -> ``(B, H, K, D)`` and the assignment
    mass ``sum_t P[t, c]`` ``(B, H, K)``. The softmax over clusters runs through the attention
    entry point with the tokens' keys as queries, the clusters' queries as keys and the identity
    as values, so its output is the probability matrix itself; queries and keys are zero-padded
    to the identity's width (the scores and the explicit scale do not change) because fused
    kernels want one head width for q, k and v.
    """
    b, h, kc, d = q_c.shape
    from .attention import attention

    width = max(d, kc)
    eye = F.pad(torch.eye(kc, dtype=q_c.dtype, device=q_c.device), (0, width - kc)).expand(b, h, kc, width)
    probs = attention(F.pad(k, (0, width - d)), F.pad(q_c, (0, width - d)), eye, scale=d ** -0.5,
                      backend=backend)[..., :kc]  # (B, H, N, K): softmax over the clusters
    if mode == "hard":
        probs = hardmax_st(probs, dim=-1)
    weights = probs.transpose(-1, -2)  # (B, H, K, N)
    mass = weights.sum(-1)
    return (weights / (mass[..., None] + eps)) @ v, mass


class ClusterAttention(nn.Module):
    """Global attention over ``(B, N + K, C)`` whose last ``K`` tokens are att0 clusters (thesis
    ``Attention`` with clusters): queries from all rows, keys and values from the ``N`` tokens
    only; token rows are plain softmax attention, cluster rows use ``assignment`` (None: softmax
    over tokens; ``soft``/``hard``: :func:`assign_aggregate` with eps 1e-5). Parameter names as
    :class:`hfactory.layers.mixers.Attention` (``qkv``, ``proj``).

    With ``token_sizes`` (after a merge) it takes the sizes ``(B, N)`` of the ``N`` tokens,
    ``forward(x, sizes)`` (``takes_token_sizes``, :mod:`hfactory.layers.token_sizes`), and the
    token rows get a log-size key bias."""

    def __init__(self, dim: int, num_heads: int, dim_head: int, num_clusters: int, assignment: Optional[str] = None,
                 qkv_bias: bool = True, proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 rotary: bool = False, dim_in: Optional[int] = None, q_stride=None, backend: str = "auto",
                 token_sizes: bool = False):
        super().__init__()
        self.num_heads, self.dim_head, self.attn_drop, self.backend = num_heads, dim_head, attn_drop, backend
        self.num_clusters, self.assignment = num_clusters, assignment
        self.takes_token_sizes = token_sizes  # the token-sizes protocol (hfactory.layers.token_sizes)
        inner = num_heads * dim_head
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .attention import attention

        b, total, _ = x.shape
        n = total - self.num_clusters
        q, k, v = (t.reshape(b, total, self.num_heads, self.dim_head).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        k, v = k[:, :, :n], v[:, :, :n]
        drop = self.attn_drop if self.training else 0.0
        bias = key_size_bias(sizes, b, n, "cluster_attention", q.dtype) if self.takes_token_sizes else None
        o_tokens = attention(q[:, :, :n], k, v, bias, dropout_p=drop, backend=self.backend)
        if self.assignment is None:
            o_clusters = attention(q[:, :, n:], k, v, dropout_p=drop, backend=self.backend)
        else:
            o_clusters, _ = assign_aggregate(q[:, :, n:], k, v, self.assignment, 1e-5, self.backend)
        o = torch.cat([o_tokens, o_clusters], dim=2).transpose(1, 2).reshape(b, total, -1)
        return self.proj_drop(self.proj(o))


class Att0Clusters(nn.Module):
    """Makes att0's ``K`` clusters at the start of the stage before the ``att0`` downsampler and
    appends them: ``(B, H, W, C) -> (B, H*W + K, C)``. Learnable ``clusters`` ``(K, C)`` (normal
    std 0.02) when ``init`` is None, else the downsampler ``init`` (``C -> 2C`` on an
    ``(H', W')`` grid with ``K = 2 H' W'``), its cells' channel halves as two clusters each.

    The learnable clusters are listed by the encoder's ``no_weight_decay`` (like position
    embeddings and timm's class tokens; the thesis decays them).

    Raises:
        ValueError: the input grid is not the one the cluster count was made for.
    """

    def __init__(self, dim: int, grid: list[int], num_clusters: int, init: Optional[nn.Module] = None):
        super().__init__()
        self.grid, self.num_clusters = tuple(grid), num_clusters
        self._no_weight_decay = ("clusters",) if init is None else ()
        if init is None:
            self.clusters = nn.Parameter(torch.zeros(num_clusters, dim))
            nn.init.normal_(self.clusters, std=0.02)
            self.init = None
        else:
            self.init = init  # built by the builder (hfactory.builder.build_component)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:3]) != self.grid:
            raise ValueError(f"att0 makes {self.num_clusters} clusters for the {self.grid[0]}x{self.grid[1]} grid of the "
                             f"spec's img_size, got a {x.shape[1]}x{x.shape[2]} grid; run the model at that img_size")
        b, c = x.shape[0], x.shape[-1]
        if self.init is None:
            clusters = self.clusters.expand(b, -1, -1)
        else:
            clusters = self.init(x).reshape(b, self.num_clusters, c)  # b h w (two d) -> b (h w two) d
        return torch.cat([x.flatten(1, 2), clusters.to(x.dtype)], dim=1)

    def strip(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H*W + K, C) -> (B, H, W, C)``: the stage's grid tokens without the clusters."""
        return x[:, : self.grid[0] * self.grid[1]].reshape(x.shape[0], *self.grid, x.shape[-1])


class Att0Pool(nn.Module):
    """Thesis ``Attention0Pooling``: ``(B, H*W + K, C_in)`` (tokens, then the clusters the previous
    stage updated) -> ``(B, H', W', C_out)`` (``grid_out``) or ``(B, K/2, C_out)``.

    ``norm1`` of tokens and clusters; aggregation (``to_q`` from clusters, ``to_kv`` from tokens,
    ``to_out``, no biases; ``last_assignment`` None = softmax over tokens, else
    :func:`assign_aggregate` with eps 1e-6, whose mass averaged over heads is each cluster's size);
    ``res_scale(clusters) + aggregated``; consecutive cluster pairs concatenated, ``norm2``
    (``2 C_in``) and ``proj`` (``Linear(2 C_in, C_out)``, no bias). With an assignment the module
    emits token sizes (``emits_token_sizes``, :mod:`hfactory.layers.token_sizes`): ``forward``
    returns ``(tokens, sizes)`` with the pair sums of the sizes ``(B, K/2)``; without one it
    returns the tokens alone. Sizes of the incoming tokens are not used (``token_sizes_in`` is
    accepted and ignored, as before: the assignment counts every token once)."""

    def __init__(self, in_chs: int, out_chs: int, in_grid: list[int], out_grid: list[int], num_heads: int,
                 last_assignment: Optional[str] = None, res_scale: bool = True, grid_out: bool = False,
                 norm: Optional[nn.Module] = None, pair_norm: Optional[nn.Module] = None, token_sizes_in: bool = False,
                 backend: str = "auto"):
        super().__init__()
        from .block import Scale

        self.in_tokens = math.prod(in_grid)
        self.out_grid, self.grid_out = tuple(out_grid), grid_out
        self.num_clusters = 2 * math.prod(out_grid)
        self.num_heads, self.last_assignment, self.backend = num_heads, last_assignment, backend
        # the token-sizes protocol (hfactory.layers.token_sizes): the assignment mass is a size
        self.emits_token_sizes = last_assignment is not None
        self.norm1 = build_norm(norm)
        self.to_q = nn.Linear(in_chs, in_chs, bias=False)
        self.to_kv = nn.Linear(in_chs, 2 * in_chs, bias=False)
        self.to_out = nn.Linear(in_chs, in_chs, bias=False)
        self.res_scale = Scale(in_chs) if res_scale else nn.Identity()
        self.norm2 = build_norm(pair_norm)
        self.proj = nn.Linear(2 * in_chs, out_chs, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor):
        from .attention import attention

        b, total, c = x.shape
        if total != self.in_tokens + self.num_clusters:
            raise ValueError(f"att0 expects {self.in_tokens} tokens and {self.num_clusters} clusters (the spec's "
                             f"img_size), got {total} rows; run the model at that img_size")
        tokens, clusters = x[:, : self.in_tokens], x[:, self.in_tokens:]
        t, cl = self.norm1(tokens), self.norm1(clusters)
        q = self._heads(self.to_q(cl))
        k, v = (self._heads(u) for u in self.to_kv(t).chunk(2, dim=-1))
        if self.last_assignment is None:
            agg, sizes = attention(q, k, v, backend=self.backend), None
        else:
            agg, mass = assign_aggregate(q, k, v, self.last_assignment, 1e-6, self.backend)
            sizes = mass.mean(1).reshape(b, -1, 2).sum(-1)  # (B, K/2): heads averaged, pairs summed
        agg = self.to_out(agg.transpose(1, 2).reshape(b, self.num_clusters, c))
        y = (self.res_scale(clusters) + agg).reshape(b, self.num_clusters // 2, 2 * c)
        y = self.proj(self.norm2(y))
        y = y.reshape(b, *self.out_grid, -1) if self.grid_out else y
        return (y, sizes) if self.emits_token_sizes else y


def att0(role: str = "pool", **resolved) -> nn.Module:
    """Builder of the ``att0`` registry entry: the plan writes ``role: pool`` for the downsampler
    itself and ``role: clusters`` for the previous stage's ``carry`` (:class:`Att0Clusters`)."""
    return Att0Clusters(**resolved) if role == "clusters" else Att0Pool(**resolved)
