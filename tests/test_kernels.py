"""Correctness of the in-batch softmax implementations against a float64 truth (chunked and the
reference at ragged shapes; the Triton kernels under TRITON_INTERPRET=1 at small ones), input
checks, and memory shape of what is saved for backward."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from kernel_cases import (
    TRITON_DEVICE,
    check_against_truth,
    impl_fn,
    loss_and_grads,
    make_inputs,
    on,
    plain_torch,
    rel_err,
)

from transrec.kernels import KernelInputError, auto_impl, inbatch_softmax
from transrec.kernels import triton_config as tc
from transrec.kernels.triton_config import DESIGN_ENV, MAX_D, SPLIT_ENV

SHAPES = [(47, 123, 31), (252, 507, 123)]


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_impls_match_truth(impl, dtype, shape):
    n, m, d = shape
    taus = [1.0, 0.07] if n < 100 else [0.07]  # the large shape: the peaky temperature only (time)
    for bias, mask, reduction, tau in itertools.product([False, True], [False, True], ["mean", "sum", "none"],
                                                        taus):
        check_against_truth(impl, n, m, d, dtype, bias=bias, mask=mask, reduction=reduction, tau=tau,
                            **({"chunk_size": 19 if n < 100 else 100} if impl == "chunked" else {}))


def test_chunked_peaky_errors_are_small():
    """The rule alone would pass if torch were wildly wrong too: pin fp32 errors absolutely."""
    errs = check_against_truth("chunked", 252, 507, 123, torch.float32, bias=True, mask=True,
                               reduction="mean", tau=0.05, chunk_size=64)
    assert max(e for e, _ in errs) < 1e-5


# Triton under the interpreter: (n, m, d, block_dc) with 32x32 tiles. 47x123x31: ragged rows, columns
# and D in one chunk; 40x70x40 / 16: three D chunks, the last partial; 33x65x64 / 16: four chunks.
TRITON_CASES = [(47, 123, 31, None), (40, 70, 40, 16), (33, 65, 64, 16)]
# On a GPU, pinned tiles must be rows of the autotune table and D chunks the default layout (anything
# else was never compiled by the sm_90 check): the GPU runs these cases with the tiles it may launch.
ON_GPU = TRITON_DEVICE == "cuda"


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-dc{c[3]}")
def test_triton_interpreted_matches_truth(case):
    n, m, d, bdc = case
    grid = [(True, True, "mean", 0.07), (False, False, "sum", 1.0), (True, False, "none", 0.3)]
    for bias, mask, reduction, tau in grid:
        check_against_truth("triton", n, m, d, torch.float32, bias=bias, mask=mask, reduction=reduction,
                            tau=tau, block_dc=None if ON_GPU else bdc)


def test_triton_interpreted_bf16_and_tiles():
    check_against_truth("triton", 47, 123, 31, torch.bfloat16, bias=True, mask=True, reduction="none",
                        tau=0.1)
    tiles = dict(block_m=64, block_n=32) if ON_GPU else dict(block_m=16, block_n=64)
    check_against_truth("triton", 47, 123, 31, torch.float32, bias=True, mask=False, reduction="mean",
                        tau=0.2, **tiles)
    if not ON_GPU:  # (the fp32 tables have no such row)
        # 64 rows of k a program: the dK pass in its plain orientation over three D chunks (the
        # interpreter's 32-row tiles run it transposed)
        check_against_truth("triton", 40, 70, 40, torch.float32, bias=True, mask=True, reduction="none",
                            tau=0.1, block_m=16, block_n=64, block_dc=16)
        # q (forward) and k (backward) reloaded every step instead of kept: the other tuning choice
        check_against_truth("triton", 47, 123, 31, torch.float32, bias=True, mask=True, reduction="none",
                            tau=0.1, block_m=32, block_n=32, resident=False)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "x".join(map(str, c[:3])) + f"-dc{c[3]}")
def test_triton_split_design_matches_truth(case):
    """The "split" design (LSE-only forward, dQ pass in backward) under the same rule, in fp32 and
    bf16 (bf16 on the one-chunk case only: time), and against the "fused" design's gradients."""
    n, m, d, bdc = case
    bdc = None if ON_GPU else bdc
    check_against_truth("triton", n, m, d, torch.float32, bias=True, mask=True, reduction="none", tau=0.07,
                        block_dc=bdc, design="split")
    if bdc is None:
        check_against_truth("triton", n, m, d, torch.bfloat16, bias=True, mask=False, reduction="mean",
                            tau=0.1, design="split")
    if not ON_GPU:  # 64 rows of q a program: the dQ pass in its plain orientation (32: transposed)
        check_against_truth("triton", n, m, d, torch.float32, bias=True, mask=False, reduction="sum",
                            tau=0.3, block_dc=bdc, design="split", block_m=64, block_n=16)
    q, k, t, b = on(TRITON_DEVICE, *make_inputs(n, m, d, seed=7)[:4])
    w = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(TRITON_DEVICE)
    split, fused = (loss_and_grads(impl_fn("triton"), q, k, t, b, 0.2, None, "none", weights=w, design=x,
                                   block_dc=bdc) for x in ("split", "fused"))
    for name, x, y in zip(["loss", "dq", "dk", "dbias"], split, fused):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# Split-M under the interpreter: (n, m, d, block_dc, S, dtype, tiles). N never a multiple of the
# block; M from fewer k tiles than chunks (33x20: two of four chunks empty) to several tiles a chunk;
# three D chunks (the D-loop forward, dQ and dK passes of three accumulators).
SPLIT_M_CASES = [
    (47, 123, 31, None, 2, torch.float32, {}),
    (33, 20, 24, None, 4, torch.float32, dict(block_m=16, block_n=16)),
    (40, 70, 40, 16, 3, torch.float32, {}),
    (47, 123, 31, None, 3, torch.bfloat16, {}),
]


@pytest.mark.skipif(ON_GPU, reason="interpreter tiles; the GPU runs split-M in the benchmark's sweep")
@pytest.mark.parametrize("case", SPLIT_M_CASES,
                         ids=lambda c: "x".join(map(str, c[:3])) + f"-S{c[4]}-{str(c[5])[6:]}")
def test_triton_split_m_matches_truth(case):
    """Split over the streamed side (S chunks: partial LSE statistics merged by the combine kernel,
    partial dQ / dK / d(bias) summed over S) under the accuracy rule, with bias and masked rows; the
    tolerance grows with the extra reduction over S (fp32 partials: log2(S) more roundings)."""
    n, m, d, bdc, splits, dtype, tiles = case
    extra = 1 + math.log2(splits)
    tol = (2e-5 if dtype == torch.float32 else 2e-3) * extra
    check_against_truth("triton", n, m, d, dtype, bias=True, mask=True, reduction="none", tau=0.07,
                        block_dc=bdc, design="split", split=splits, tol=tol, **tiles)
    if dtype == torch.float32:  # the same kernels unsplit: equal up to the order of the sums
        q, k, t, b = on(TRITON_DEVICE, *make_inputs(n, m, d, seed=3)[:4])
        w = torch.randn(n, generator=torch.Generator().manual_seed(4))
        got, base = (loss_and_grads(impl_fn("triton"), q, k, t, b, 0.2, None, "none", weights=w,
                                    design="split", block_dc=bdc, split=x, **tiles) for x in (splits, "off"))
        for name, x, y in zip(["loss", "dq", "dk", "dbias"], got, base):
            torch.testing.assert_close(x, y, rtol=1e-5 * extra, atol=1e-6 * extra, msg=name)


@pytest.mark.skipif(ON_GPU, reason="interpreter tiles")
def test_triton_split_m_fused_design_splits_the_dk_pass_only():
    """The fused forward keeps its dQ accumulator whole (no split); its dK pass splits over q."""
    from transrec.kernels.triton_backward import backward_dk_launch  # optional: triton (Linux only)
    from transrec.kernels.triton_forward import forward_launch  # optional: triton (Linux only)
    from transrec.kernels.triton_op import canonical_inputs  # optional: triton (Linux only)

    q, k, t, _, _ = make_inputs(47, 123, 31, seed=2)
    q, k, t, b = canonical_inputs(q, k, t, None)
    assert forward_launch(q, k, b, t, 0.1, True, split=3)[0].grid == (2, 1)
    assert forward_launch(q, k, b, t, 0.1, False, split=3)[0].grid == (2, 3)
    lse2, g = torch.zeros(47), torch.ones(47)
    assert backward_dk_launch(q, k, b, t, lse2, g, 0.1, True, True, split=2)[0].grid == (4, 2)
    check_against_truth("triton", 47, 123, 31, torch.float32, bias=True, mask=True, reduction="mean", tau=0.1,
                        design="fused", split=2, tol=2e-5 * 2)


def test_split_count_heuristic_and_mode(monkeypatch):
    """S from the SM count: none where the programs fill two waves, enough chunks otherwise, each of
    at least SPLIT_MIN_STEPS streamed tiles; a forced S; the partial buffer's cap; bad values."""
    assert tc.split_count(8192, 8192, 64, 64) == 3  # 128 programs on 132 SMs
    assert tc.split_count(8192, 8192, 64, 64, sms=64) == 1  # 2 waves of a 64-SM card
    assert tc.split_count(65536, 65536, 64, 64) == 1
    assert tc.split_count(1000, 256, 64, 64) == 1  # 4 k tiles: one chunk of SPLIT_MIN_STEPS
    assert tc.split_count(100, 10**6, 64, 64) == tc.SPLIT_MAX
    assert tc.num_splits("off", 8192, 8192, 64, 64) == 1
    assert tc.num_splits("auto", 8192, 8192, 64, 64) == 3
    assert tc.num_splits(5, 8192, 8192, 64, 64) == 5
    cap = tc.SPLIT_BUFFER_BYTES // (8192 * 4 * 1024)
    assert tc.num_splits(16, 8192, 8192, 64, 64, 4 * 1024) == cap < 16
    assert tc.split_mode() == tc.SPLIT_DEFAULT == "off"  # opt-in until a card has timed it
    monkeypatch.setenv(tc.SPLIT_ENV, "auto")
    assert tc.split_mode() == "auto" and tc.split_mode(2) == 2 and tc.split_mode("off") == "off"
    monkeypatch.setenv(tc.SPLIT_ENV, "4")
    assert tc.split_mode() == 4
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(tc.SPLIT_ENV, bad)
        with pytest.raises(KernelInputError, match="TRANSREC_TRITON_SPLIT must be"):
            tc.split_mode()
    with pytest.raises(KernelInputError, match="split must be"):
        tc.split_mode(0)


def test_triton_design_switch(monkeypatch):
    """The design comes from the table, $TRANSREC_TRITON_DESIGN or the call; a bad name is one clear
    error; a split forward keeps no [N, D] buffer for backward."""
    from transrec.kernels.triton_op import design_of  # optional: triton (Linux only)

    assert set(tc.DESIGN) == {"small", "d256", "large", "xl"} and set(tc.DESIGN.values()) <= set(tc.DESIGNS)
    monkeypatch.setenv(tc.DESIGN_ENV, "split")
    assert design_of(768) == "split" and design_of(64, "fused") == "fused"
    q, k, t, b = on(TRITON_DEVICE, *make_inputs(12, 20, 8, seed=2)[:4])
    leaves = [x.clone().requires_grad_(True) for x in (q, k, b)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        loss = inbatch_softmax(*leaves[:2], t, bias=leaves[2], impl="triton")
    assert (12, 8) in saved and saved.count((12, 8)) == 1, saved  # q itself, no A
    loss.backward()
    assert all(x.grad is not None for x in leaves)
    monkeypatch.setenv(tc.DESIGN_ENV, "fast")
    with pytest.raises(KernelInputError, match="TRANSREC_TRITON_DESIGN must be one of") as info:
        inbatch_softmax(q, k, t, impl="triton")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("impl", ["triton", "triton-split", "chunked"])
def test_partial_gradients_and_no_grad(impl, monkeypatch):
    """Only some inputs need grad (each constexpr switch, in both Triton designs), and a forward
    under no_grad."""
    if impl == "triton-split":
        monkeypatch.setenv(DESIGN_ENV, "split")
        impl = "triton"
    q, k, t, b, _ = make_inputs(40, 50, 24, seed=3)
    q, k, t, b = on(TRITON_DEVICE if impl == "triton" else "cpu", q, k, t, b)
    ref = inbatch_softmax(q, k, t, bias=b, temperature=0.2, impl="torch", reduction="none")
    with torch.no_grad():
        out = inbatch_softmax(q, k, t, bias=b, temperature=0.2, impl=impl, reduction="none")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for need in ([False, True, False], [False, False, True], [True, False, False]):
        leaves = [x.clone().requires_grad_(r) for x, r in zip((q, k, b), need)]
        ref_leaves = [x.clone().requires_grad_(r) for x, r in zip((q, k, b), need)]
        loss = inbatch_softmax(*leaves[:2], t, bias=leaves[2], temperature=0.2, impl=impl)
        ref = inbatch_softmax(*ref_leaves[:2], t, bias=ref_leaves[2], temperature=0.2, impl="torch")
        g = torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])[0]
        g_ref = torch.autograd.grad(ref, [x for x in ref_leaves if x.requires_grad])[0]
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "triton-split-m", "chunked", "torch"])
def test_minus_inf_bias_equals_dropping_the_column(impl, monkeypatch):
    """Duplicates across ranks are masked by bias -inf: such a column must vanish exactly (split-M:
    under the interpreter's 32-column tiles the second of two chunks holds only such columns)."""
    if impl == "triton-split-m":
        monkeypatch.setenv(DESIGN_ENV, "split")
        monkeypatch.setenv(SPLIT_ENV, "2")
        impl = "triton"
    q, k, t, b, _ = make_inputs(30, 40, 16, seed=5)
    t = t % 30  # targets avoid the dropped columns 30..39
    q, k, t, b = on(TRITON_DEVICE if impl == "triton" else "cpu", q, k, t, b)
    b_inf = b.clone()
    b_inf[30:] = float("-inf")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, b_inf)]
    loss = inbatch_softmax(leaves[0], leaves[1], t, bias=leaves[2], temperature=0.1, impl=impl)
    gq, gk, gb = torch.autograd.grad(loss, leaves)
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k[:30], b[:30])]
    ref = inbatch_softmax(ref_leaves[0], ref_leaves[1], t, bias=ref_leaves[2], temperature=0.1, impl="torch")
    rq, rk, rb = torch.autograd.grad(ref, ref_leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gk[:30], rk, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb[:30], rb, rtol=1e-4, atol=1e-6)
    assert gk[30:].abs().max() == 0 and gb[30:].abs().max() == 0


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_saved_memory_is_linear_not_n_by_m(impl):
    """Nothing of size N x M is kept for backward (chunked: O(chunk x M) transient only)."""
    n, m, d = 64, 96, 8
    q, k, t, b, _ = make_inputs(n, m, d, seed=2)
    q, k, t, b = on(TRITON_DEVICE if impl == "triton" else "cpu", q, k, t, b)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, b)]
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = inbatch_softmax(*leaves[:2], t, bias=leaves[2], impl=impl, chunk_size=8
                               if impl == "chunked" else None)
    loss.backward()
    assert max(saved) < n * m, f"{impl} saved a tensor of {max(saved)} elements (N x M = {n * m})"
    assert sum(saved) <= 2 * (n * d + m * d) + 4 * (n + m)


def _bad(**over):
    q, k, t, b, mask = make_inputs(6, 9, 4, mask=True, seed=1)
    args = dict(q=q, k=k, target=t, bias=b, temperature=0.5, row_mask=mask, reduction="mean", impl="chunked")
    args.update(over)
    return args


@pytest.mark.parametrize("over, words", [
    (dict(k=torch.randn(9, 5)), "embedding size"),
    (dict(q=torch.randn(6, 4, 1)), "2-D"),
    (dict(q=torch.randn(0, 4), target=torch.zeros(0, dtype=torch.long), row_mask=None), "empty batch"),
    (dict(k=torch.randn(0, 4), bias=None), "empty candidate"),
    (dict(target=torch.full((6,), 9)), "target out of range"),
    (dict(target=torch.zeros(5, dtype=torch.long)), "target must have shape"),
    (dict(target=torch.zeros(6)), "integer"),
    (dict(bias=torch.zeros(8)), "bias must be"),
    (dict(row_mask=torch.ones(6)), "row_mask"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=0.0), "temperature"),
    (dict(reduction="avg"), "reduction"),
    (dict(impl="cuda"), "impl"),
    (dict(k=torch.ones(9, 4, dtype=torch.long)), "floating"),
])
def test_bad_input_raises_one_clear_error(over, words):
    args = _bad(**over)
    with pytest.raises(ValueError, match=words) as info:
        inbatch_softmax(args.pop("q"), args.pop("k"), args.pop("target"), **args)
    assert isinstance(info.value, KernelInputError) and "\n" not in str(info.value)


@pytest.mark.parametrize("impl", ["chunked", "torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast-bf16", "no-autocast"])
def test_mixed_dtypes_meet_in_one(impl, reduction, autocast):
    """A model under autocast(bf16) ends its user encoder in an fp32 LayerNorm while the item side
    gives bf16: the loss takes both, computes in autocast's dtype (in the promoted dtype without
    autocast), and each gradient comes back in its input's dtype. Accuracy rule, as everywhere: no
    worse than plain torch in the compute dtype, against a float64 truth. The backward runs inside
    the autocast region too (the harder case for a custom backward)."""
    n, m, d, tau = 37, 53, 24, 0.1  # the presets train at 0.07-0.1
    q, k, t, b, row_mask = make_inputs(n, m, d, mask=True, seed=4)
    k = k.to(torch.bfloat16)
    dev = TRITON_DEVICE if impl == "triton" else "cpu"
    q, k, t, b, row_mask = on(dev, q, k, t, b, row_mask)
    compute = torch.bfloat16 if autocast else torch.float32
    weights = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dev)
    truth = loss_and_grads(impl_fn("torch"), q.to(compute), k, t, b, tau, row_mask, reduction,
                           upcast=torch.float64, weights=weights)

    def run(fn, autocast=autocast):
        leaves = [q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True),
                  b.detach().clone().requires_grad_(True)]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(leaves[0], leaves[1], t, leaves[2], tau, row_mask, reduction)
            scalar = (loss * weights.to(loss.dtype)).sum() if reduction == "none" else loss
            grads = torch.autograd.grad(scalar, leaves)
        return [loss.detach()] + [g.detach() for g in grads]

    # the yardstick of every kernel test: plain torch with all inputs in the compute dtype
    plain = lambda q, k, t, b, *a: plain_torch(q.to(compute), k.to(compute), t, b.to(compute), *a)
    got, base = run(impl_fn(impl)), run(plain, autocast=False)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.bfloat16  # each input's own dtype
    tol = 2e-3 if autocast else 2e-5
    for name, g, bs, tr in zip(["loss", "dq", "dk", "dbias"], got, base, truth):
        assert torch.isfinite(g).all(), name
        e, e0 = rel_err(g, tr), rel_err(bs, tr)
        assert e <= e0 + tol, f"{impl} {name}: error {e:.3g} > plain torch {e0:.3g} + {tol}"


def test_auto_picks_triton_only_where_a_launch_exists():
    assert auto_impl("cuda", torch.bfloat16, 768) == "triton"
    assert auto_impl("cuda", torch.float32, MAX_D) == "triton"
    assert auto_impl("cuda", torch.float64, 64) == "chunked"  # no fp64 launch
    assert auto_impl("cuda", torch.bfloat16, MAX_D + 1) == "chunked"  # wider than any config
    assert auto_impl("cpu", torch.bfloat16, 64) == "chunked"


def test_masked_rows_may_carry_any_target():
    q, k, t, b, mask = make_inputs(6, 9, 4, mask=True, seed=1)
    t = torch.where(mask, t, torch.full_like(t, 1000))
    for impl in ("chunked", "torch", "triton"):
        dev = TRITON_DEVICE if impl == "triton" else "cpu"
        out = inbatch_softmax(*on(dev, q, k, t), bias=b.to(dev), row_mask=mask.to(dev), impl=impl,
                              reduction="none").cpu()
        assert torch.isfinite(out).all() and (out[~mask] == 0).all()


class _MatmulFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2 a b c for every [a, b] x [b, c] product, in-place and out= variants included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[:2] if name == "mm" else args[1:3]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction, products", [("mean", 3), ("sum", 3), ("none", 4)])
def test_chunked_schedule_counts_each_product_once(reduction, products):
    """A reduced loss forms its gradients in the forward: 6 N M D flops for forward+backward (logits,
    dQ, dK once each); per-row losses recompute the logits in backward: 8 N M D."""
    n, m, d = 60, 70, 12
    q, k, t, b, mask = make_inputs(n, m, d, mask=True, seed=4)
    q, k, b = (x.requires_grad_(True) for x in (q, k, b))
    with _MatmulFlops() as counter:
        out = inbatch_softmax(q, k, t, bias=b, row_mask=mask, reduction=reduction, impl="chunked",
                              chunk_size=16)
        out.sum().backward()
    assert counter.flops == products * 2 * n * m * d


def test_chunked_reduced_without_grad_forms_no_gradient():
    """Under no_grad (evaluation) the reduced schedule computes the loss alone, and equals the
    per-row schedule reduced."""
    n, m, d = 50, 40, 8
    q, k, t, b, mask = make_inputs(n, m, d, mask=True, seed=6)
    q.requires_grad_(True)
    with torch.no_grad(), _MatmulFlops() as counter:
        loss = inbatch_softmax(q, k, t, bias=b, row_mask=mask, impl="chunked", chunk_size=7)
    assert counter.flops == 2 * n * m * d
    rows = inbatch_softmax(q.detach(), k, t, bias=b, row_mask=mask, impl="chunked", reduction="none")
    torch.testing.assert_close(loss, rows.sum() / mask.sum(), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(4096, 4096, 256), (2047, 3001, 123), (1024, 2048, 768)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_gpu_bf16_large(shape):
    """bf16 at sizes that exercise the autotuned tiles and the D chunks on the card."""
    n, m, d = shape
    torch.manual_seed(0)
    q, k, t, b, mask = make_inputs(n, m, d, torch.bfloat16, bias=True, mask=True)
    dev = torch.device("cuda")
    args = on(dev, q, k, t, b, mask)

    w = torch.randn(n, device=dev)
    truth = loss_and_grads(impl_fn("torch"), *args[:4], 0.05, args[4], "none", upcast=torch.float64,
                           weights=w)
    base = loss_and_grads(plain_torch, *args[:4], 0.05, args[4], "none", weights=w)
    got = loss_and_grads(impl_fn("triton"), *args[:4], 0.05, args[4], "none", weights=w)
    for name, g, bs, tr in zip(["loss", "dq", "dk", "dbias"], got, base, truth):
        e, e0 = rel_err(g, tr), rel_err(bs, tr)
        assert e <= e0 + 2e-3, f"{name}: {e:.3g} > torch bf16 {e0:.3g}"
